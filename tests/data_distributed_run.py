"""Run by tests/test_data_distributed.py under torchrun (2 gloo processes): reads two epochs of a
prepared folder with the streaming loader (one worker per process) and gathers which slot read
which sample, then trains the image-text job for two steps on both processes.

    torchrun --nproc_per_node 2 tests/data_distributed_run.py PREPARED OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from transfusion_pytorch.data.loader import LoaderConfig, StreamingLoader
from transfusion_pytorch.jobs import image_text
from transfusion_pytorch.training import distributed


def main(prepared: str, out: str):
    torch.set_num_threads(1)
    info = distributed.setup('cpu')
    loader = StreamingLoader([prepared], lambda shape: 1 + 3 + 1 + shape[0] * shape[1] + 1,
                             LoaderConfig(max_tokens = 200, num_workers = 1, shuffle_buffer = 8), rank = info.rank, world_size = info.world_size)
    read = []
    for _ in range(12):
        batch = loader.next_batch()
        read.append(dict(slot = batch.global_index % 2, keys = [k.split(':', 1)[1] for k in batch.indices]))
    loader.close()
    everything = distributed.all_gather_object(read)
    if info.is_main:
        Path(out).mkdir(parents = True, exist_ok = True)
        (Path(out) / 'read.json').write_text(json.dumps(everything))

    config = image_text.ImageTextConfig(data = (prepared,), out_root = out, name = 'ddp', steps = 2, dim = 32, depth = 1, heads = 2,
                                        dim_head = 16, max_tokens = 200, workers = 1, log_every = 1, sample_every = 2, samples_per_prompt = 1,
                                        modality_steps = 2, threads = 1)
    image_text.run_job(config)
    distributed.teardown()


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2])
