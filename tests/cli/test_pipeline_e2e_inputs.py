"""End to end, the inputs of the real `cbmir` entry point: a bad one is a one-line message, a
replaced data file is run again. (Split from test_pipeline_e2e.py so that `--dist loadfile`
can run the two halves on two workers.)"""

from __future__ import annotations

import json

import pytest
from tests.helpers import run_cbmir_in as run_cbmir


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["data.size=100"], "28, 64, 128, 224"),
        (["data=nosuchdata"], "Available options"),
        (["model=nosuchmodel"], "Available options"),
        (["data.download=false"], "breastmnist.npz"),
        (["channels_last=sometimes"], "use true, false or auto"),
    ],
)
def test_bad_input_is_a_message_not_a_traceback(dirs, args, message) -> None:
    proc = run_cbmir(["model=pixels", *args], dirs, check=False)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert message in text
    assert "Traceback" not in text
    assert not list(dirs["store"].iterdir())


def test_resume_skips_a_finished_job_until_its_data_file_is_replaced(dirs, tmp_path) -> None:
    from cbmir.data.synthetic import write_digits_npz

    data = write_digits_npz(tmp_path / "mine.npz", size=28, seed=0)
    run_dir = tmp_path / "run"
    args = ["experiment=offline", "model=pixels", "data=npz", f"data.path={data}",
            "resume=true", f"hydra.run.dir={run_dir}"]  # fmt: skip
    run_cbmir(args, dirs)
    first = json.loads((run_dir / "metrics.json").read_text())
    skipped = run_cbmir(args, dirs)
    assert "skipping, results exist" in skipped.stdout + skipped.stderr
    assert json.loads((run_dir / "metrics.json").read_text()) == first

    write_digits_npz(data, size=28, seed=1)  # another split of the digits, same path
    rerun = run_cbmir(args, dirs)
    assert "input changed since it finished" in rerun.stdout + rerun.stderr
    again = json.loads((run_dir / "metrics.json").read_text())
    assert sorted(again["embedded_now"]) == ["test", "train"]  # new contents, new store keys
