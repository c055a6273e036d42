"""Run by tests/test_data_distributed.py under torchrun (2 gloo processes): the image-text job on a
prepared folder, with the streaming loader (one worker per process), three times in a row:

    full      8 steps, uninterrupted
    crashed   the same, stopped by an error after step 5 (its last checkpoint is step 3) ...
              ... then rerun, which resumes from step 3 and trains to step 8

and writes OUT_DIR/batches.json: per run, per rank, per step, the keys of the samples that rank
trained on (the resumed run's steps overwrite the crashed run's).

    torchrun --nproc_per_node 2 tests/resume_distributed_run.py PREPARED OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch

from transfusion_pytorch.data.loader import StreamingLoader
from transfusion_pytorch.jobs import image_text
from transfusion_pytorch.training import Every, distributed


class RecordingLoader(StreamingLoader):
    """The job's loader, noting the keys of each batch it hands out."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.taken = []

    def next_batch(self):
        batch = super().next_batch()
        self.taken.extend(batch.indices)
        return batch


class Stop(Exception):
    pass


def train(prepared: str, out: str, name: str, stop_after: int | None = None) -> dict:
    """Runs (or resumes) the job; returns {step: sample keys} of this rank."""
    record = {}

    def note(trainer, step):
        record[step], trainer.loader.taken = list(trainer.loader.taken), []
        if step == stop_after:
            raise Stop(step)

    config = image_text.ImageTextConfig(data = (prepared,), out_root = out, name = name, steps = 8, checkpoint_every = 3, dim = 32, depth = 1,
                                        heads = 2, dim_head = 16, max_tokens = 113, workers = 1, shuffle_buffer = 4, log_every = 1,
                                        sample_every = 1000, threads = 1, warmup_steps = 2)
    try:
        image_text.run_job(config, callbacks = [Every(1, note)])
    except Stop:
        pass
    return record


def main(prepared: str, out: str):
    torch.set_num_threads(1)
    info = distributed.setup('cpu')
    image_text.StreamingLoader = RecordingLoader
    runs = dict(full = train(prepared, out, 'full'), crashed = train(prepared, out, 'crashed', stop_after = 5))
    runs['crashed'].update(train(prepared, out, 'crashed'))
    gathered = distributed.all_gather_object(runs)
    if info.is_main:
        batches = {run: [gathered[rank][run] for rank in range(info.world_size)] for run in runs}
        (Path(out) / 'batches.json').write_text(json.dumps(batches))
    distributed.teardown()


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2])
