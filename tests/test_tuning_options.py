"""Performance settings that must be right at start. --omp-wait-policy: the encoder sets
OMP_WAIT_POLICY before torch loads (OpenMP reads it once), rejects a value OpenMP does not
know, and leaves the environment alone when empty. --query-batches, --index-batch and
--index-pipeline: at least one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from encoder_service.config import EncoderConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = ("import os, sys; from encoder_service.config import EncoderConfig; "
         "EncoderConfig(omp_wait_policy=sys.argv[1]).apply_openmp_policy(); "
         "assert 'torch' not in sys.modules; print(os.environ.get('OMP_WAIT_POLICY', '-'))")


def _policy_after(value: str, env_policy: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env_policy is not None:
        env["OMP_WAIT_POLICY"] = env_policy
    done = subprocess.run([sys.executable, "-c", PROBE, value], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.strip()


def test_the_default_is_passive_and_set_before_torch_loads() -> None:
    assert EncoderConfig().omp_wait_policy == "passive"
    assert _policy_after("passive", None) == "PASSIVE"
    assert _policy_after("active", "PASSIVE") == "ACTIVE"  # the option beats the variable


def test_empty_leaves_the_environment_as_it_is() -> None:
    assert _policy_after("", "ACTIVE") == "ACTIVE"
    assert _policy_after("", None) == "-"


def test_an_unknown_policy_stops_the_encoder_with_the_reason() -> None:
    done = subprocess.run([sys.executable, "-m", "clipsearch.cli", "serve", "encoder",
                           "--omp-wait-policy", "sleepy"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert "cannot start: --omp-wait-policy 'sleepy': expected passive, active" in done.stderr


def test_too_late_once_torch_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch  # noqa: F401  (the point: torch is in sys.modules)

    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    with pytest.warns(UserWarning, match="no effect"):
        EncoderConfig(omp_wait_policy="passive").apply_openmp_policy()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


@pytest.mark.parametrize("flag", ["--query-batches", "--index-batch", "--index-pipeline"])
def test_search_service_refuses_zero_batches(flag: str) -> None:
    """Zero search batches, Index items per batch or Index batches in flight would let
    nothing run: refused at start, with the reason."""
    done = subprocess.run([sys.executable, "-m", "clipsearch.cli", "serve", "search",
                           flag, "0", "--encoder", "127.0.0.1:1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"cannot start: {flag} 0: at least 1" in done.stderr
