"""workdir.code_provenance: which checkout and commit a training run's code came from, checked
against git's own answers, and the trap it exists for: an editable install of one checkout run
from another (a `git worktree` without PYTHONPATH=.) trains the first checkout's code with the
second's experiment files."""

import json
import subprocess
from pathlib import Path

import instseg_jax
from instseg_jax import workdir as workdir_lib

PACKAGE = Path(instseg_jax.__file__).resolve().parent


def git(*args: str) -> str | None:
    """git's answer about the package's folder; None where git or a checkout is missing (an
    exported tree), where the record must say None too."""
    try:
        done = subprocess.run(["git", "-C", str(PACKAGE), *args], capture_output=True, text=True)
    except OSError:
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def test_the_record_names_the_commit_and_uncommitted_files_git_reports():
    record = workdir_lib.code_provenance()
    assert record["package"] == str(PACKAGE)
    assert record["code_repo"] == git("rev-parse", "--show-toplevel")
    assert record["commit"] == git("rev-parse", "HEAD")
    changed = git("diff", "--name-only", "HEAD")
    if changed is None:
        assert record["uncommitted"] is None
    else:
        assert sorted(record["uncommitted"]) == sorted(changed.splitlines())


def test_an_experiment_of_this_checkout_is_not_flagged():
    experiment = PACKAGE.parent / "experiments" / "maskrcnn_nuclei.py"
    record = workdir_lib.code_provenance(f"{experiment}:smoke")
    assert record["experiment_file"] == str(experiment)
    assert record["shadowed_package"] is None


def test_an_experiment_beside_another_checkouts_package_is_flagged(tmp_path):
    other = tmp_path / "worktree"
    (other / "instseg_jax").mkdir(parents=True)
    (other / "instseg_jax" / "__init__.py").write_text("")
    (other / "experiments").mkdir()
    experiment = other / "experiments" / "x.py"
    experiment.write_text("")
    record = workdir_lib.code_provenance(str(experiment))
    assert record["shadowed_package"] == str(other / "instseg_jax")
    _, warnings = workdir_lib.provenance_lines(record)
    assert len(warnings) == 1 + bool(record["uncommitted"])
    assert str(PACKAGE) in warnings[-1] and "PYTHONPATH" in warnings[-1]


def test_uncommitted_code_is_warned_and_every_start_is_kept(tmp_path):
    record = {
        "package": "/x/instseg_jax",
        "code_repo": "/x",
        "commit": "0123456789abcdef",
        "uncommitted": ["instseg_jax/train.py"],
        "experiment_file": None,
        "shadowed_package": None,
    }
    info, warnings = workdir_lib.provenance_lines(record)
    assert info == ["code: /x/instseg_jax at commit 0123456789, 1 uncommitted files"]
    assert warnings == [
        "the code has uncommitted changes ([instseg_jax/train.py]): this run's figures are not "
        "those of commit 0123456789 alone"
    ]
    workdir_lib.append_provenance(tmp_path, record)
    workdir_lib.append_provenance(tmp_path, {**record, "uncommitted": []})
    starts = json.loads((tmp_path / "provenance.json").read_text())
    assert [s["uncommitted"] for s in starts] == [["instseg_jax/train.py"], []]
    assert all(s["started"] and s["argv"] and s["jax"] for s in starts)
