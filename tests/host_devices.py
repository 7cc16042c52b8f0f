"""Runs a script in a fresh Python process with several CPU host devices.

XLA's host device count is fixed when JAX starts, so tests that need a
multi-device mesh run their check in a subprocess.
"""

import os
import subprocess
import sys


def run_script(script: str, devices: int = 4) -> str:
  """Runs ``script`` on ``devices`` host devices; returns its stdout.

  Fails the calling test, with the script's output, if it exits non-zero.
  """
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
    env.get("XLA_FLAGS", "")
    + f" --xla_force_host_platform_device_count={devices}"
  ).strip()
  env["JAX_PLATFORMS"] = "cpu"
  result = subprocess.run(
    [sys.executable, "-c", script],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  return result.stdout
