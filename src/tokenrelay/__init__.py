"""tokenrelay: resumable, shareable streaming backend for LLM applications.

The distribution installs this one import package. Its subpackages live in the
repository's top-level folders (pyproject's ``package-dir``): ``api/`` is
``tokenrelay.api``, ``worker/`` is ``tokenrelay.worker``, ``shared/`` is
``tokenrelay.shared`` and ``cli/`` is ``tokenrelay.cli``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tokenrelay")
except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
    __version__ = "0+unknown"
