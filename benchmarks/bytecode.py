"""Whether Python finds the named packages' bytecode cached, or compiles their sources at every import (a
read-only install without .pyc files, or PYTHONDONTWRITEBYTECODE): start-up time depends on it.

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
    writable = os.access(folder if os.path.isdir(folder) else os.path.dirname(folder), os.W_OK)
    return f"{'cached' if os.path.exists(cached) else 'not cached'}, cache {'writable' if writable else 'read-only'}"


if __name__ == "__main__":
    print(f"python {sys.version.split()[0]}, dont_write_bytecode {sys.flags.dont_write_bytecode}, "
          f"pycache_prefix {sys.pycache_prefix}")
    for name in sys.argv[1:]:
        print(f"  {name}: {bytecode_state(name)}")
