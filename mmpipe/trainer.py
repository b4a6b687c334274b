"""``mmpipe train RUN_DIR``: train (or resume) a run's model outside the flow, also under torchrun.

``torchrun --nproc_per_node=N -m mmpipe train RUN_DIR [train.key=value ...]`` starts one process
per GPU (gloo on CPU); each builds the same config, rank 0 builds the shards and writes the stage
with the same digests as the flow's train task (``mmcore.execute.run_stage``), so the run is not
stale afterwards.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from mmcore import execute, graph, tables
from mmcore.errors import MMPipeError
from mmcore.layout import RunLayout, StagePaths

USAGE = "usage: mmpipe train RUN_DIR [train.key=value ...]   (torchrun ... -m mmpipe train RUN_DIR ...)"


def main(argv: list[str]) -> int:
    """``RUN_DIR [key=value ...]``: train from the run's config and its split stage; exit code."""
    import torch
    import torch.distributed as dist

    from mmcore.config import load_config
    from mmcore.stale import extra_digest

    if not argv:
        print(USAGE, file=sys.stderr)
        return 2
    run_dir, overrides = Path(argv[0]).resolve(), argv[1:]
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        if not RunLayout(run_dir).config.is_file():
            raise MMPipeError(f"not a run folder (no {RunLayout(run_dir).config.name}): {run_dir}")
        cfg = load_config(RunLayout(run_dir).config, overrides).model_copy(update={"out": run_dir})
        if distributed:
            cuda = torch.cuda.is_available() and cfg.train.device != "cpu"
            if cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if cuda else "gloo")
        split = StagePaths.of(run_dir, graph.stage("train").input)  # train's input stage (pseudo, after split)
        table = tables.read_parquet(split.kept)
        rank = dist.get_rank() if distributed else 0
        # The same digests the train task records: input (split's kept table), config, code, extra.
        stats = execute.run_stage(
            "train", cfg, table, tables.file_digest(split.kept), extra_digest("train", cfg),
            ctx=execute.context(cfg, progress=sys.stderr.isatty()), write=rank == 0,
        )
        if stats is not None:
            print(f"train: {stats['steps']} steps on {stats['device']}, final loss {stats['final_loss']}, "
                  f"val i2t R@5 {stats['val_i2t_r5']} (chance {stats['chance_r5']}) -> {stats['model_dir']}")
        return 0
    except MMPipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
