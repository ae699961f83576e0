"""`autopose model-info` through the CLI entry point."""

from __future__ import annotations

import re

import pytest

from autopose.cli import main
from autopose.models.complexity import model_info


def test_model_info_prints_params_and_both_gflops(capsys: pytest.CaptureFixture) -> None:
    assert main(["model-info", "--arch", "p2net_r18_prog", "--input", "128x96", "--joints", "16"]) == 0
    out = capsys.readouterr().out
    info = model_info("p2net_r18_prog", input_size=(128, 96), num_joints=16)
    assert f"{info['params']:,}" in out
    assert f"{info['gflops_hrnet']:.2f}  (MACs / 2^30" in out
    assert f"{info['gflops_1e9']:.2f}  (MACs / 1e9)" in out
    assert "paper" not in out


def test_model_info_for_p2net_r101_cites_the_paper(capsys: pytest.CaptureFixture) -> None:
    assert main(["model-info", "--arch", "p2net_r101", "--input", "384x288"]) == 0
    out = capsys.readouterr().out
    assert "42.5 M params, 26.3 GFLOPs" in out
    deviations = [float(x) for x in re.findall(r"([+-]\d+\.\d)%", out)]
    assert len(deviations) == 3 and all(abs(d) <= 10 for d in deviations)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["model-info", "--arch", "p2net_r19"], "valid: p2net_r18"),
        (["model-info", "--arch", "p2net_r18", "--input", "64x50"], "--input"),
        (["model-info", "--arch", "p2net_r18", "--input", "big"], "--input"),
    ],
)
def test_model_info_bad_input_is_one_clear_line(argv: list[str], needle: str, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
