"""WebDataset shards: folder -> shards -> the same images in the same order; shuffles fixed by a seed; bad members and
empty patterns as one-line errors; every sample read exactly once per epoch across processes and workers."""
import io, random, tarfile
from pathlib import Path
import numpy as np, pytest, tifffile, torch
from affmae.readers import EMDataError
from affmae.data import EMSources
from affmae.shards import pack_shards, shard_list, read_shard, ShardStream, shard_dls, INDEX
from affmae.cli import main


@pytest.fixture(scope='module')
def packed(tmp_path_factory):
    "12 slices (a folder of 8 8-bit TIFFs and a 4-plane 16-bit stack) packed 2 per shard: 6 shards."
    root = tmp_path_factory.mktemp('em')
    rng = np.random.default_rng(0)
    (root / 'imgs').mkdir()
    for i in range(8): tifffile.imwrite(root / 'imgs' / f'{i:02d}.tif', rng.integers(0, 255, (40, 48), dtype=np.uint8))
    tifffile.imwrite(root / 'stack.tif', rng.integers(0, 4000, (4, 40, 48), dtype=np.uint16))
    files = pack_shards([root / 'imgs', root / 'stack.tif'], root / 'sh', size=2)
    return root, files


def test_round_trip_same_images_same_order(packed):
    root, files = packed
    src = EMSources([root / 'imgs', root / 'stack.tif'])
    back = [(name, a) for f in files for _, name, a in read_shard(f)]
    assert len(files) == 6 and len(back) == len(src) == 12
    for i, (name, a) in enumerate(back):
        assert name == src.name(i) and a.dtype == src.image(i).dtype and np.array_equal(a, src.image(i))


def stream_names(files, seed, rank=0, world=1, workers=1):
    "The sample names every worker of `rank` reads in one pass of its shards, shuffled from `seed`."
    ss = ShardStream(files, size=32, rank=rank, world=world)
    ss.epoch_seed = seed
    return [name for w in range(workers) for name, _ in ss.samples(ss.split(rank, world, w, workers))]


def test_shuffled_order_fixed_by_seed(packed):
    _, files = packed
    a, b, c = stream_names(files, 3), stream_names(files, 3), stream_names(files, 4)
    assert a == b and a != c and sorted(a) == sorted(c)


@pytest.mark.parametrize('world,workers', [(1, 1), (2, 1), (3, 2), (2, 3)])
def test_each_sample_once_per_epoch(packed, world, workers):
    _, files = packed
    for seed in range(3):
        names = [n for r in range(world) for n in stream_names(files, seed, r, world, workers)]
        assert len(names) == 12 and len(set(names)) == 12


def test_loader_batches_under_two_processes(packed, monkeypatch):
    "Each of 2 processes takes half an epoch, from its own shards, through 2 workers."
    root, files = packed
    seen = []
    for rank in range(2):
        monkeypatch.setenv('RANK', str(rank))
        monkeypatch.setenv('WORLD_SIZE', '2')
        random.seed(0)                                                    # every process seeds alike
        dls = shard_dls(str(root / 'sh' / 'shard-{000000..000005}.tar'), size=32, bs=3, valid_pct=0, num_workers=2,
                        device='cpu')
        assert len(dls.train) == 2
        batches = list(dls.train)
        assert [b[0].shape for b in batches] == [(3, 1, 32, 32)] * 2
        seen.append(dls.train.dataset.split(rank, 2))
    assert not set(seen[0]) & set(seen[1])


def test_pretrain_streams_shards(packed, tmp_path):
    "`affmae pretrain --data 'DIR/shard-{...}.tar'`: 5 shards train, 1 validates, a checkpoint at the end."
    root, _ = packed
    pat = str(root / 'sh' / 'shard-{000000..000005}.tar')
    assert main(['pretrain', '--data', pat, '--arch', 'affmae_tiny', '--img-size', '32', '--bs', '2', '--epochs', '1',
                 '--precision', 'none', '--valid-pct', '0.2', '--workers', '2', '--out', str(tmp_path)]) == 0
    assert (tmp_path / 'checkpoints' / 'epoch_000.safetensors').is_file()


def test_corrupt_member_names_shard_and_member(packed, tmp_path):
    _, files = packed
    bad = tmp_path / 'shard-000000.tar'
    with tarfile.open(files[0]) as src, tarfile.open(bad, 'w') as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if m.name.endswith('1.npy'): data = data[:20]                 # the second sample's image, cut short
            m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    with pytest.raises(EMDataError) as e: list(read_shard(bad))
    msg = str(e.value)
    assert '\n' not in msg and msg.startswith(f'{bad}: member 000000001.npy: cannot decode')


def test_empty_or_missing_shard_patterns(packed, tmp_path, capsys):
    root, _ = packed
    with pytest.raises(EMDataError, match='no data paths'): shard_list('')
    with pytest.raises(EMDataError, match=r'shard-000000.tar: no such shard \(3 of the 3 shards'):
        shard_list(str(tmp_path / 'shard-{000000..000002}.tar'))
    assert main(['pretrain', '--data', str(tmp_path / 'shard-{000000..000002}.tar'),
                 '--out', str(tmp_path / 'r')]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'no such shard' in err


def test_pack_refuses_bad_size_and_full_folder(packed, tmp_path):
    root, _ = packed
    assert main(['shards', str(root / 'stack.tif'), '--out', str(tmp_path / 's'), '--size', '0']) == 2
    assert main(['shards', str(root / 'stack.tif'), '--out', str(tmp_path / 's')]) == 0
    assert (tmp_path / 's' / INDEX).is_file()
    assert main(['shards', str(root / 'stack.tif'), '--out', str(tmp_path / 's')]) == 2


def test_gpu_bench_script_runs_tiny_on_cpu(tmp_path):
    "kernels/bench_shards.py --tiny: packs synthetic EM, streams it into a tiny model, writes its JSON."
    import json, os, subprocess, sys
    root = Path(__file__).parents[1]
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get('PYTHONPATH', '')]))
    cmd = [sys.executable, str(root / 'kernels' / 'bench_shards.py'), '--tiny', '--out', str(tmp_path / 'b.json')]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / 'b.json').read_text())
    assert res['sizes']['steps'] == 4 and res['step_ms'] > 0 and 0 <= res['data_frac'] < 1
    assert res['pack']['n_shards'] == 3
