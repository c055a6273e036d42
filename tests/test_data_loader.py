"""The streaming loader: each sample once per epoch over ranks and workers, the token budget,
exact resume, fresh latents each epoch, layouts, mixing, and refusing mismatched data."""

import math
import multiprocessing
import os
import signal
import time

import pytest
import torch

pytest.importorskip('PIL')          # the data extra

from transfusion_pytorch.data import loader as loader_module
from transfusion_pytorch.data.codecs import CodecMismatch
from transfusion_pytorch.data.loader import LoaderConfig, LoaderTimeout, StreamingLoader, epoch_references, modality_tokens_of, slot_runs
from transfusion_pytorch.data.prepare import PrepareConfig, prepare
from transfusion_pytorch.data.shards import Shard
from transfusion_pytorch.data.tokenizers import TokenizerMismatch
from transfusion_pytorch.training import packed_num_tokens

from data_helpers import make_tokenizer, make_vae, prepared_set

pytestmark = pytest.mark.usefixtures('one_thread')


def tokens_4x4(shape):
    """META, shape digits '4 , 4', BOM, 16 latent tokens, EOM: as the model lays out a 4 x 4 latent."""
    return 1 + 3 + 1 + shape[0] * shape[1] + 1


@pytest.fixture(scope = 'module')
def shapes45(tmp_path_factory):
    return prepared_set(tmp_path_factory.mktemp('shapes45'), num = 45)           # shards of 16, 16 and 13 samples


def make(folders, **options):
    rank, world_size = options.pop('rank', 0), options.pop('world_size', 1)
    options = dict(dict(max_tokens = 200, shuffle_buffer = 8, num_workers = 0), **options)
    return StreamingLoader(folders, tokens_4x4, LoaderConfig(**options), rank = rank, world_size = world_size)


def sample_key(batch, position):
    return batch.indices[position].split(':', 1)[1]


@pytest.mark.parametrize('world_size, workers', [(1, 0), (2, 2), (3, 1)])
def test_each_sample_is_read_once_per_epoch_by_all_ranks_and_workers(shapes45, world_size, workers):
    """Batches carry global_index = batch * slots + slot; each slot reads its share of an epoch
    before the next epoch, so the first `share` samples of every slot are one epoch."""
    num_slots = world_size * max(1, workers)
    shares = [45 * (s + 1) // num_slots - 45 * s // num_slots for s in range(num_slots)]
    by_slot = {s: [] for s in range(num_slots)}
    for rank in range(world_size):
        loader = make([shapes45], rank = rank, world_size = world_size, num_workers = workers)
        while min(len(by_slot[s]) for s in range(rank * max(1, workers), (rank + 1) * max(1, workers))) < 2 * 45 // num_slots + 2:
            batch = loader.next_batch()
            by_slot[batch.global_index % num_slots].extend(sample_key(batch, i) for i in range(len(batch.samples)))
            assert batch.num_tokens <= 200
        loader.close()
    epochs = [[key for s in range(num_slots) for key in by_slot[s][e * shares[s]:(e + 1) * shares[s]]] for e in range(2)]
    everything = sorted(e['key'] for path in shapes45.shard_paths() for e in Shard(path).samples)
    for epoch in epochs:
        assert sorted(epoch) == everything                   # every sample once, none twice
    assert epochs[0] != epochs[1]                            # reshuffled


def test_references_cover_the_epoch_whatever_the_buffer():
    sizes = [5, 7, 3, 9]
    for num_slots in (1, 2, 5):
        for buffer in (1, 4, 100):
            refs = [r for slot in range(num_slots) for r in epoch_references(
                loader_module.Source('s', [], sizes, [], False, False), 0, 3, slot, num_slots, seed = 1, buffer = buffer)]
            assert sorted(refs) == sorted((shard, i) for shard, n in enumerate(sizes) for i in range(n))
    assert slot_runs([5, 7], [1, 0], 0, 3) == [(1, 0, 4)]       # 12 samples, 4 per slot, shard 1 first


def test_batches_hold_whole_samples_within_the_budget(shapes45):
    from transfusion_pytorch import Transfusion
    model = Transfusion(num_text_tokens = 256, dim_latent = 48, modality_default_shape = (4, 4), transformer = dict(dim = 16, depth = 1, dim_head = 8, heads = 2))
    loader = StreamingLoader([shapes45], modality_tokens_of(model), LoaderConfig(max_tokens = 150, num_workers = 0, shuffle_buffer = 8))
    count = packed_num_tokens(model)
    stored = {e['key']: e for path in shapes45.shard_paths() for e in Shard(path).samples}
    batches = [loader.next_batch() for _ in range(12)]
    for batch, following in zip(batches, batches[1:]):
        lengths = [count(sample) for sample in batch.samples]
        assert batch.num_tokens == sum(lengths) <= 150
        for position, sample in enumerate(batch.samples):
            entry = stored[sample_key(batch, position)]
            text = next(e for e in sample if not e.is_floating_point())
            latent = next(e for e in sample if e.is_floating_point())
            assert text.numel() == entry['text_tokens'] and tuple(latent.shape) == (4, 4, 48)
        assert batch.num_tokens + count(following.samples[0]) > 150         # greedy: the next sample did not fit


def test_a_sample_over_the_budget_is_an_error_naming_it(shapes45):
    with pytest.raises(ValueError, match = r'sample images/\d+\.png of .* has \d+ tokens, more than the budget of max_tokens = 40: raise max_tokens'):
        make([shapes45], max_tokens = 40)


@pytest.mark.parametrize('workers', [0, 2])
def test_resume_gives_the_same_batches_bitwise(tmp_path, workers):
    prepared = prepared_set(tmp_path, num = 40, vae = str(make_vae(tmp_path / 'vae')))       # stochastic latents
    shapes = lambda shape: 1 + 3 + 1 + shape[0] * shape[1] + 1

    def loader():
        return StreamingLoader([prepared], shapes, LoaderConfig(max_tokens = 600, num_workers = workers, shuffle_buffer = 6))

    first = loader()
    for _ in range(7):
        first.next_batch()
    state = first.state_dict()
    expected = [first.next_batch() for _ in range(9)]           # crosses into the next epoch
    first.close()

    resumed = loader()
    resumed.load_state_dict(state)
    for want in expected:
        got = resumed.next_batch()
        assert (got.indices, got.epoch, got.global_index, got.num_tokens) == (want.indices, want.epoch, want.global_index, want.num_tokens)
        for a, b in zip(got.samples, want.samples):
            assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    resumed.close()
    assert {0, 1} <= {b.epoch for b in expected}               # the position crossed an epoch


def test_a_fresh_latent_each_epoch_from_the_stored_posterior(tmp_path):
    prepared = prepared_set(tmp_path, num = 6, vae = str(make_vae(tmp_path / 'vae')))
    stored = {}
    for path in prepared.shard_paths():
        with Shard(path) as shard:
            stored.update({e['key']: shard.tensors(i) for i, e in enumerate(shard.samples)})
    loader = StreamingLoader([prepared], lambda shape: 3 + shape[0] * shape[1] + 3, LoaderConfig(max_tokens = 300, num_workers = 0))
    seen = {}                                   # the n-th time a sample comes, it is of epoch n
    while len(seen) < 6 or min(map(len, seen.values())) < 3:
        batch = loader.next_batch()
        for position, sample in enumerate(batch.samples):
            key = sample_key(batch, position)
            latent = next(e for e in sample if e.is_floating_point())
            noise = (latent - stored[key]['mean']) / stored[key]['std']
            assert abs(noise.std().item() - 1) < 0.35 and abs(noise.mean().item()) < 0.35
            seen.setdefault(key, []).append(latent)
    for latents in seen.values():
        assert not torch.equal(latents[0], latents[1]) and not torch.equal(latents[1], latents[2])


def test_caption_then_image_at_the_configured_share(shapes45):
    loader = make([shapes45], caption_fraction = 0.2, max_tokens = 2000)
    firsts = [sample[0].is_floating_point() for _ in range(20) for sample in loader.next_batch().samples]     # 900 samples
    share = sum(firsts) / len(firsts)
    assert abs(share - 0.2) < 4 * math.sqrt(0.2 * 0.8 / len(firsts)), share
    assert all(not sample[0].is_floating_point() for sample in make([shapes45], caption_fraction = 0.).next_batch().samples)


def test_image_text_and_text_rows_mix_by_weight(tmp_path, shapes45):
    corpus = tmp_path / 'corpus.txt'
    corpus.write_text(''.join(f'line {i} of some text\n' for i in range(30)))
    text = prepare(PrepareConfig(source = str(corpus), out = str(tmp_path / 'text'), progress = False))
    loader = make([shapes45, text], weights = (0.7, 0.3), max_tokens = 1000)
    samples = [s for _ in range(30) for s in loader.next_batch().samples]
    text_share = sum(len(s) == 1 and not s[0].is_floating_point() for s in samples) / len(samples)
    assert abs(text_share - 0.3) < 4 * math.sqrt(0.3 * 0.7 / len(samples)), text_share
    mix = loader.mix()
    assert mix[str(text.folder)] == pytest.approx(text_share) and sum(mix.values()) == pytest.approx(1.)
    assert loader.state_dict()['weights'] == [0.7, 0.3]


def test_data_from_another_tokenizer_is_refused(tmp_path, shapes45):
    words = prepared_set(tmp_path / 'words', num = 8, tokenizer = str(make_tokenizer(tmp_path / 'tok')))
    with pytest.raises(TokenizerMismatch, match = r'the data in .*words/prepared was tokenized with the tokenizer .*tok \(vocabulary 15, '
                                                  r'fingerprint \w+\), but the data in .* uses UTF-8 bytes \(vocabulary 256\)'):
        make([shapes45, words])
    with pytest.raises(TokenizerMismatch, match = 'but this run uses the tokenizer'):
        StreamingLoader([shapes45], tokens_4x4, LoaderConfig(max_tokens = 200, num_workers = 0), tokenizer = words.tokenizer)
    # the same words in another tokenizer (another vocabulary order) are refused too
    other = prepared_set(tmp_path / 'other', num = 8, tokenizer = str(make_tokenizer(tmp_path / 'tok2', extra_words = ('aardvark',))))
    with pytest.raises(TokenizerMismatch):
        make([words, other])


def test_data_from_another_codec_is_refused(tmp_path, shapes45):
    patch2 = prepared_set(tmp_path, num = 8, patch = 2)
    with pytest.raises(CodecMismatch, match = r'is the patch codec with patch 2, but the data in .* is the patch codec with patch 4'):
        make([shapes45, patch2], max_tokens = 1000)


def test_a_slot_keeps_few_shards_open(tmp_path, monkeypatch):
    prepared = prepared_set(tmp_path, num = 64, shard_size = 4)        # 16 shards
    open_now, most = set(), [0]
    real_open, real_close = Shard.open, Shard.close

    def tracked_open(self):
        open_now.add(id(self))
        most[0] = max(most[0], len(open_now))
        return real_open(self)

    def tracked_close(self):
        open_now.discard(id(self))
        return real_close(self)

    monkeypatch.setattr(Shard, 'open', tracked_open)
    monkeypatch.setattr(Shard, 'close', tracked_close)
    loader = make([prepared], open_shards = 3, shuffle_buffer = 6)
    for _ in range(40):
        loader.next_batch()
    assert 1 < most[0] <= 3


def test_too_few_samples_for_the_readers_is_an_error(tmp_path):
    prepared = prepared_set(tmp_path, num = 3)
    with pytest.raises(ValueError, match = r'has 3 samples, fewer than the 4 readers \(2 ranks x 2 workers\): use fewer workers'):
        make([prepared], world_size = 2, num_workers = 2)


def test_a_position_from_other_settings_is_refused(shapes45):
    state = make([shapes45], seed = 1).state_dict()
    with pytest.raises(ValueError, match = 'saved with seed = 1; this loader has seed = 0'):
        make([shapes45]).load_state_dict(state)


def test_a_position_of_another_rank_is_refused(shapes45):
    """Each rank resumes from its own position (a checkpoint keeps every rank's): another rank's,
    or one saved before positions carried their rank (rank 0's), is refused on rank 1."""
    state = make([shapes45], rank = 0, world_size = 2).state_dict()
    assert state['rank'] == 0
    with pytest.raises(ValueError, match = "the data position is rank 0's, and this loader is rank 1's: each rank resumes from its own"):
        make([shapes45], rank = 1, world_size = 2).load_state_dict(state)
    del state['rank']
    with pytest.raises(ValueError, match = "rank 0's, and this loader is rank 1's"):
        make([shapes45], rank = 1, world_size = 2).load_state_dict(state)
    make([shapes45], rank = 0, world_size = 2).load_state_dict(state)


@pytest.mark.skip(reason = 'hung twice in full-suite runs (the SIGSTOPped worker is not resumed or the timeout never fires): to be fixed; passes alone')
def test_a_stopped_worker_is_an_error_naming_it_after_the_timeout(shapes45):
    """Issue 25, item 12: a worker stopped with SIGSTOP (as a hung file system would) used to
    hang training forever; after `timeout` seconds without a batch the loader names it."""
    before = set(multiprocessing.active_children())
    loader = make([shapes45], num_workers = 2, prefetch_factor = 1, timeout = 2)
    loader.next_batch()                                         # the workers are up
    workers = [p for p in multiprocessing.active_children() if p not in before]
    assert len(workers) == 2
    stopped = workers[0]
    os.kill(stopped.pid, signal.SIGSTOP)
    try:
        start = time.perf_counter()
        with pytest.raises(LoaderTimeout, match = rf'DataLoader worker \d, pid {stopped.pid} gave no batch in 2 s \(the loader timeout\): '
                                                  r'it is stuck .* raise the timeout \(LoaderConfig\.timeout'):
            for _ in range(10):                                 # the batches the workers had ready come first
                loader.next_batch()
        assert time.perf_counter() - start < 10
    finally:
        os.kill(stopped.pid, signal.SIGCONT)
        loader.close()
    for worker in workers:
        worker.join(timeout = 10)
    assert not any(worker.is_alive() for worker in workers)


def test_a_bad_timeout_is_refused():
    from transfusion_pytorch.jobs.image_text import ImageTextConfig
    with pytest.raises(ValueError, match = r'timeout must be a number of seconds >= 0 \(0: wait forever\), got -1'):
        LoaderConfig(max_tokens = 100, timeout = -1)
    with pytest.raises(ValueError, match = r"'loader_timeout' must be a number of seconds >= 0 \(0: wait forever\), got nan"):
        ImageTextConfig(data = 'prepared', loader_timeout = float('nan'))
