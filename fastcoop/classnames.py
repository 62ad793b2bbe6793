"""How a class name is said in a prompt: CoOp's prompt learner writes underscores as spaces. Kept apart (no torch)
so that the dataset readers, the prompts and the CLI say names the same way."""


def spoken(classname: str) -> str:
    """A class name as the prompts say it."""
    return classname.replace("_", " ")
