"""The environment a child Python process gets: this one's, without ``XLA_FLAGS``.

``XLA_FLAGS`` belongs to the process that set it: the tests' ``conftest.py`` fakes 8 CPU
devices with it, and a benchmark may tune its own compiler. A child run (the CLI as users run
it, a launched sweep point, a benchmark's peer worker) should see the machine as it is, so
every place that starts one takes its environment from here.
"""

from __future__ import annotations

import os


def child_env(*pythonpath: str | os.PathLike) -> dict[str, str]:
  """This process's environment minus ``XLA_FLAGS``, with ``pythonpath`` put first.

  Args:
    *pythonpath: directories to put in front of any ``PYTHONPATH`` already set (e.g. a
      test's fixtures and the repository root).

  Returns:
    A fresh dict, safe to modify, for ``subprocess.run(..., env=...)``.
  """
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if pythonpath:
    rest = [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []
    env["PYTHONPATH"] = os.pathsep.join([*map(os.fspath, pythonpath), *rest])
  return env
