"""Whether Python finds the named packages' bytecode cached, or compiles their sources at every import (a
read-only install without .pyc files, or PYTHONDONTWRITEBYTECODE): start-up time depends on it. Exits 1 when
any named package's bytecode is not cached.

    python benchmarks/bytecode.py torch open_clip
"""

import importlib.util
import os
import sys


def bytecode_state(package: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return "not found"
    cached = importlib.util.cache_from_source(spec.origin)
    folder = os.path.dirname(cached)
    while not os.path.isdir(folder):  # Python makes the missing folders (a pycache prefix's, or __pycache__)
        folder = os.path.dirname(folder)
    writable = os.access(folder, os.W_OK)
    return f"{'cached' if os.path.exists(cached) else 'not cached'}, cache {'writable' if writable else 'read-only'}"


if __name__ == "__main__":
    print(f"python {sys.version.split()[0]}, dont_write_bytecode {sys.flags.dont_write_bytecode}, "
          f"pycache_prefix {sys.pycache_prefix}")
    states = {name: bytecode_state(name) for name in sys.argv[1:]}
    for name, state in states.items():
        print(f"  {name}: {state}")
    sys.exit(0 if all(state.startswith("cached") for state in states.values()) else 1)
