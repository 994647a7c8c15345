"""The process group is destroyed at interpreter exit in multi-process runs (engine/distributed.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_process_group_destroyed_at_exit(tmp_path):
    script = textwrap.dedent(
        f"""
        import atexit, torch, torch.distributed as dist
        from dyhead_cli.engine.distributed import destroy_process_group_at_exit
        dist.init_process_group("gloo", init_method="file://{tmp_path / "store"}", rank=0, world_size=1)
        # atexit runs handlers last-in first-out: this one runs after ours and reports what it left
        atexit.register(lambda: print("initialized at exit:", dist.is_initialized(), flush=True))
        destroy_process_group_at_exit()
        destroy_process_group_at_exit()  # registered once
        print("initialized:", dist.is_initialized(), flush=True)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == ["initialized: True", "initialized at exit: False"]
