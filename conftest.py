"""Collection rules for the whole repository (tests/conftest.py configures the tests).

Flax is optional: without it, the doctests of the Flax adapter are not collected (the
adapter itself raises an ImportError naming `pip install flax`; tests/test_nnx.py checks).
"""

import importlib.util

collect_ignore = []
if importlib.util.find_spec("flax") is None:
    collect_ignore += ["jaxlinear/nnx.py", "jaxlinear/_src/nnx.py"]
