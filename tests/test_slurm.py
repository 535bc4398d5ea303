"""slurm.sh on one 'node' of this machine: stand-ins for srun and scontrol (Slurm's own
tools, which CI does not have) run the real launcher command, which trains for real on CPU."""

import json
import os
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_slurm_script_launches_composer_and_resumes(tmp_path):
    from data.prepare import prepare

    prepare(inputs=[str(ROOT / "data/corpus/tiny_corpus.jsonl")], output=str(tmp_path / "data"),
            seq_len=64, val_ratio=0.0, progress=False)
    cfg = yaml.safe_load((ROOT / "yamls/tiny.yaml").read_text())
    cfg["model"].update(d_model=32, n_layer=2, layer_pattern="M*", d_intermediate=0,
                        ssm_cfg={"d_state": 8, "headdim": 16, "chunk_size": 16},
                        attn_cfg={"num_heads": 2})
    cfg["data"].update(local=str(tmp_path / "data"), seq_len=64, global_batch_size=4,
                       micro_batch_size=4, eval_batch_size=4, eval_split=None)
    cfg["variables"]["seq_len"] = 64
    cfg.update(max_duration="3ba", save_interval="3ba", export_folder=None, sample=None,
               progress_bar=False, loggers={})
    cfg["scheduler"]["warmup"] = "1ba"  # tiny.yaml's 20ba would not fit in this 3-batch run
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho 127.0.0.1\n")
    # srun: drop its own flags, run the task once as node 0
    (bin_dir / "srun").write_text("#!/bin/sh\nshift\nSLURM_NODEID=0 exec \"$@\"\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "GPUS_PER_NODE": "1",
           "SAVE_FOLDER": str(tmp_path / "ck"), "SLURM_JOB_ID": "42", "SLURM_JOB_NAME": "t",
           "VENV": str(Path(os.sys.executable).parent.parent), "MASTER_PORT": "29611",
           "PYTHONPATH": str(ROOT)}
    cmd = ["bash", str(ROOT / "slurm.sh"), str(tmp_path / "cfg.yaml"), "optimizer.lr=1e-3"]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "nodes=1 x 1 GPUs" in first.stdout and "run=t-42" in first.stdout
    assert (tmp_path / "ck" / "latest-rank0.pt").is_symlink()
    # a requeue: same job id, longer max_duration -> continues from batch 3, not from 0
    again = subprocess.run(cmd + ["max_duration=5ba"], capture_output=True, text=True, env=env,
                           cwd=ROOT, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    curve = json.loads((tmp_path / "ck" / "loss_curve.json").read_text())
    assert curve["batch"] == [1, 2, 3, 4, 5]
