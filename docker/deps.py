"""Print the dependencies of one service extra, read from pyproject.toml (the one dependency list),
so an image installs them in a layer of its own before the source is copied:

    pip install -c docker/constraints.txt $(python docker/deps.py worker)
"""

import sys
import tomllib

project = tomllib.load(open(sys.argv[2] if len(sys.argv) > 2 else "pyproject.toml", "rb"))["project"]
extra = sys.argv[1]
print(" ".join(project["dependencies"] + project["optional-dependencies"][extra]))
