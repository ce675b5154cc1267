"""`cbt-llm launch`: the rendered scripts (--dry-run) for each launcher, the shipped examples, and preflight.

Fast: no training runs here (those are in test_launch_cluster.py). Preflight runs on tiny fixture shards.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from cbt_llm.cli import main
from cbt_llm.core.config import load_config
from cbt_llm.core.errors import ConfigError
from launch.preflight import preflight
from launch.render import EXAMPLES, TrainCommand, render, render_example
from tests.fixtures.paths import ROOT
from tests.fixtures.train import make_shards


def dry_run(capsys, *argv: str) -> str:
    assert main(["launch", *argv, "--dry-run"]) == 0
    return capsys.readouterr().out


def bash_syntax_ok(text: str, tmp_path: Path) -> None:
    p = tmp_path / "script.sh"
    p.write_text(text)
    r = subprocess.run(["bash", "-n", str(p)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_deepspeed_single_node_dry_run(capsys, tmp_path):
    out = dry_run(
        capsys,
        "deepspeed",
        "--config",
        "configs/demo-cpu.yaml",
        "--gpus-per-node",
        "2",
        "train.max_steps=3",
        "launch.master_port=29777",
    )
    assert "deepspeed \\\n  --num_gpus 2 \\\n  --master_port 29777" in out
    assert "--no_ssh" not in out and "--hostfile" not in out
    # the train command carries the same config file and every override through, quoted
    assert out.rstrip().endswith("--config configs/demo-cpu.yaml train.max_steps=3 launch.master_port=29777")
    assert "--no_local_rank" in out and '"$(command -v cbt-llm)"' in out
    assert "# world size 2 = 1 node(s) x 2 process(es)" in out
    bash_syntax_ok(out, tmp_path)


def test_deepspeed_multi_node_no_ssh_and_hostfile(capsys, tmp_path):
    out = dry_run(
        capsys,
        "deepspeed",
        "--config",
        "configs/demo-cpu.yaml",
        "--nodes",
        "2",
        "--gpus-per-node",
        "4",
        "launch.master_addr=10.9.0.1",
        "launch.master_port=29600",
    )
    for piece in (
        "--no_ssh",
        "--num_nodes 2",
        '--node_rank "$NODE_RANK"',
        "--num_gpus 4",
        "--master_addr 10.9.0.1",
        "--master_port 29600",
    ):
        assert piece in out, piece
    assert 'NODE_RANK="${NODE_RANK:?' in out
    bash_syntax_ok(out, tmp_path)
    # without NODE_RANK the script refuses to start rather than guessing a rank
    p = tmp_path / "ds.sh"
    p.write_text(out)
    r = subprocess.run(["bash", str(p)], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert r.returncode != 0 and "set NODE_RANK" in r.stderr

    out = dry_run(
        capsys,
        "deepspeed",
        "--config",
        "configs/demo-cpu.yaml",
        "--nodes",
        "3",
        "--gpus-per-node",
        "8",
        "launch.hostfile=/etc/cbt/hostfile",
        "launch.master_addr=n1",
    )
    assert "--hostfile /etc/cbt/hostfile" in out and "--num_nodes 3" in out and "--no_ssh" not in out
    assert "NODE_RANK" not in out


def test_slurm_dry_run(capsys, tmp_path):
    out = dry_run(
        capsys,
        "slurm",
        "--config",
        "configs/demo-cpu.yaml",
        "--nodes",
        "4",
        "--gpus-per-node",
        "8",
        "launch.slurm.grace_s=300",
        "launch.slurm.partition=gpu",
        "launch.slurm.rdzv_port=29999",
        "train.run_dir=runs/x/train",
        "train.requeue_exit_code=86",
        "launch.slurm.max_restarts=3",
    )
    lines = out.splitlines()
    sbatch = [ln for ln in lines if ln.startswith("#SBATCH")]
    # numbers are expanded at render time: no `$NUM_NODES` left for sbatch to choke on
    assert "#SBATCH --nodes=4" in sbatch and "#SBATCH --ntasks-per-node=1" in sbatch
    assert "#SBATCH --gpus-per-node=8" in sbatch and "#SBATCH --partition=gpu" in sbatch
    assert "#SBATCH --requeue" in sbatch and "#SBATCH --signal=B:USR1@300" in sbatch
    assert "#SBATCH --output=runs/x/train/slurm/%x-%j.out" in sbatch
    assert all("$" not in s for s in sbatch)
    # every #SBATCH line precedes the first command, or sbatch ignores it
    first_cmd = next(i for i, ln in enumerate(lines) if ln and not ln.startswith("#"))
    assert max(i for i, ln in enumerate(lines) if ln.startswith("#SBATCH")) < first_cmd
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in out and "NodeAddr=" in out
    assert "srun --kill-on-bad-exit=1" in out
    assert '--rdzv_backend c10d --rdzv_endpoint "$HEAD_ADDR:$RDZV_PORT" --rdzv_id "$SLURM_JOB_ID"' in out
    assert 'torchrun --nnodes "$SLURM_NNODES" --nproc_per_node 8' in out
    assert "RDZV_PORT=29999" in out and "REQUEUE_EXIT=86" in out and "MAX_RESTARTS=3" in out
    assert "trap 'forward USR1' USR1" in out and 'kill -s "$1" "$SRUN_PID"' in out
    assert 'scontrol requeue "$SLURM_JOB_ID"' in out
    assert "${SLURM_RESTART_COUNT:-0}" in out and "-r${RESTART}-node%n.log" in out
    # srun runs in the background and the script waits in a loop, so the trap fires while training runs
    srun_line = next(ln for ln in lines if "-m cbt_llm.cli train" in ln)
    assert srun_line.rstrip().endswith("&")
    assert 'wait "$SRUN_PID"' in out
    bash_syntax_ok(out, tmp_path)

    cpu = dry_run(capsys, "slurm", "--config", "configs/demo-cpu.yaml", "launch.cpu=true")
    assert "--gpus-per-node" not in cpu and "--nproc_per_node 2" in cpu and "OMP_NUM_THREADS" in cpu


def test_ray_dry_run(capsys, tmp_path):
    out = dry_run(
        capsys,
        "ray",
        "--config",
        "configs/demo-cpu.yaml",
        "launch.ray.address=http://127.0.0.1:8265",
        "launch.ray.max_failures=3",
    )
    assert "export RAY_ADDRESS=http://127.0.0.1:8265" in out
    assert (
        "ray job submit" in out
        and "python -m cbt_llm.cli launch ray --entrypoint --config configs/demo-cpu.yaml" in out
    )
    assert "launch.ray.max_failures=3" in out
    bash_syntax_ok(out, tmp_path)


def test_overrides_with_shell_characters_are_quoted(capsys, tmp_path):
    out = dry_run(capsys, "deepspeed", "--config", "configs/demo-cpu.yaml", "run_name=a b;rm -rf x")
    assert "'run_name=a b;rm -rf x'" in out
    cmd = TrainCommand("c.yaml", ['wandb.tags=["a b", "$HOME"]'])
    ray = render("ray", load_config("configs/demo-cpu.yaml", cmd.overrides), cmd)
    bash_syntax_ok(ray, tmp_path)
    assert "\\$HOME" in ray  # not expanded by the submitting shell


def test_bad_launch_config_is_one_clear_line(capsys):
    assert main(["launch", "slurm", "--config", "configs/demo-cpu.yaml", "--dry-run", "launch.slurm.grace=30"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "launch.slurm.grace" in err and "grace_s" in err
    # world size 3 cannot come from 2 nodes when gpus_per_node is left on auto
    assert (
        main(
            [
                "launch",
                "deepspeed",
                "--config",
                "configs/demo-cpu.yaml",
                "--dry-run",
                "--nodes",
                "2",
                "data.world_size=3",
            ]
        )
        == 2
    )
    assert "--gpus-per-node" in capsys.readouterr().err


def test_examples_are_current():
    """launch/examples/ holds exactly what the renderer writes for EXAMPLES (refresh: python -m launch.render)."""
    ex_dir = ROOT / "launch" / "examples"
    for name, launcher, config, overrides in EXAMPLES:
        want = render_example(name, launcher, config, overrides)
        assert (ex_dir / name).read_text() == want, f"{name} is stale: run `python -m launch.render`"
    assert sorted(p.name for p in ex_dir.iterdir()) == sorted(e[0] for e in EXAMPLES)


# ---- preflight ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Fixture shards (4 train shards) whose manifest carries the fixture tokenizer's real content hash."""
    from transformers import AutoTokenizer

    from cbt_llm.inference.tokenizer import load_tokenizer, tokenizer_hash

    out = make_shards(tmp_path_factory.mktemp("launch") / "data", rows_per_shard=4, train_shards=4)
    man = json.loads((out / "manifest.json").read_text())
    tok = AutoTokenizer.from_pretrained(man["tokenizer"]["name_or_path"])
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    tok.save_pretrained(man["tokenizer"]["name_or_path"])
    man["tokenizer"]["hash"] = tokenizer_hash(load_tokenizer(man["tokenizer"]["name_or_path"]))
    (out / "manifest.json").write_text(json.dumps(man))
    return out


def _cfg(data: Path, run: Path, *extra: str):
    return load_config("configs/demo-cpu.yaml", [f"train.data_dir={data}", f"train.run_dir={run}", *extra])


def test_preflight_passes_and_reports(shards, tmp_path):
    facts = preflight(_cfg(shards, tmp_path / "run", "launch.gpus_per_node=2", "launch.nodes=2"), "slurm")
    assert facts["world_size"] == 4 and facts["train_shards"] == 4 and facts["steps_per_epoch"] == 2
    assert (tmp_path / "run" / "slurm").is_dir()


def test_preflight_world_size_must_divide_shards(shards, tmp_path):
    with pytest.raises(ConfigError, match=r"world size 3 .* does not divide the 4 train shards"):
        preflight(_cfg(shards, tmp_path / "run", "launch.gpus_per_node=3"), "deepspeed")


def test_preflight_missing_data_and_shard(shards, tmp_path):
    with pytest.raises(ConfigError, match="no manifest.json"):
        preflight(_cfg(tmp_path / "nowhere", tmp_path / "run"), "deepspeed")
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    next((broken / "train").glob("*.parquet")).unlink()
    man = json.loads((broken / "manifest.json").read_text())
    man["tokenizer"]["name_or_path"] = str(broken / "tokenizer")
    (broken / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ConfigError, match="is missing"):
        preflight(_cfg(broken, tmp_path / "run"), "deepspeed")


def test_preflight_tokenizer_mismatch_and_missing(shards, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(shards, other)
    man = json.loads((other / "manifest.json").read_text())
    man["tokenizer"]["hash"] = "0000000000000000"
    (other / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ConfigError, match="tokenizer mismatch"):
        preflight(_cfg(other, tmp_path / "run"), "deepspeed")
    man["tokenizer"]["name_or_path"] = str(tmp_path / "gone-tokenizer")
    (other / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ConfigError, match="gone-tokenizer.*missing"):
        preflight(_cfg(other, tmp_path / "run"), "deepspeed")
    # one '/', but under runs/: a local folder by the same rule load_tokenizer uses, so missing, not a hub id
    man["tokenizer"]["name_or_path"] = "runs/gone-tokenizer"
    (other / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ConfigError, match="runs/gone-tokenizer.*missing"):
        preflight(_cfg(other, tmp_path / "run"), "deepspeed")


def test_preflight_unwritable_run_dir(shards, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="train.run_dir: folder .* is not writable"):
        preflight(_cfg(shards, blocker / "run"), "deepspeed")


def test_launch_without_dry_run_runs_preflight_first(shards, tmp_path, capsys):
    """A bad world size stops `cbt-llm launch` before anything is submitted (exit 2, no script written)."""
    rc = main(
        [
            "launch",
            "slurm",
            "--config",
            "configs/demo-cpu.yaml",
            "--gpus-per-node",
            "3",
            f"train.data_dir={shards}",
            f"train.run_dir={tmp_path / 'run'}",
        ]
    )
    assert rc == 2 and "does not divide" in capsys.readouterr().err
    assert not (tmp_path / "run" / "launch").exists()


# ---- Dockerfile (no container engine on CI: its pins are checked against the lock file instead) ------------


def _lock() -> dict[str, str]:
    pins = {}
    for ln in (ROOT / "constraints.txt").read_text().splitlines():
        ln = ln.split("#", 1)[0].strip()
        if "==" in ln:
            name, ver = ln.split("==", 1)
            pins[name.strip().lower().replace("_", "-")] = ver.strip()
    return pins


def test_dockerfile_pins_match_lock_file():
    import re

    text = (ROOT / "Dockerfile").read_text()
    lock = _lock()
    pins = {
        m.group(1).lower().replace("_", "-"): m.group(2)
        for m in re.finditer(r"(?<![\w.-])([A-Za-z][\w.-]*)==([\w.${}]+)", text)
    }
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    pins = {k: args.get(v.strip("${}"), v) if v.startswith("$") else v for k, v in pins.items()}
    assert pins.get("torch") == lock["torch"]
    for name, ver in pins.items():
        if name in lock:
            assert ver == lock[name], f"Dockerfile pins {name}=={ver}, constraints.txt has {lock[name]}"
    # every pip install of the project and of deepspeed is constrained by the lock file
    installs = [ln for ln in text.splitlines() if "pip install" in ln and (" . " in ln + " " or "deepspeed" in ln)]
    assert installs and all("-c constraints.txt" in ln for ln in installs)
    assert "FROM nvidia/cuda:" in text and "flash-attn" in text and "DS_BUILD_FUSED_ADAM=1" in text


def test_script_is_written_whole_and_executable(tmp_path):
    """write_script goes through the one atomic writer: the script replaces the old one, executable, and no
    temporary file is left beside it."""
    import os

    from launch.submit import write_script

    cfg = load_config("configs/demo-cpu.yaml", [f"train.run_dir={tmp_path / 'run'}"])
    first = write_script("deepspeed", cfg, "echo old\n")
    path = write_script("deepspeed", cfg, "echo new\n")
    assert path == first == tmp_path / "run" / "launch" / "deepspeed.sh"
    assert path.read_text() == "echo new\n" and os.access(path, os.X_OK)
    assert [p.name for p in path.parent.iterdir()] == ["deepspeed.sh"]
