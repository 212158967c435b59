"""Split data folders too large to travel beside the working tree into parts that do.

A device call carries 64 MiB in all: the tracked working tree plus the ignored paths it names. Each folder `d` larger
than the room that leaves (less `--margin-mib`) is split into parts `d_p1`, `d_p2`, … of the same layout (hard links
to its files, largest first into the emptiest part); a file larger than the room is cut into chunks
`<name>.part1of<k>`, … that go into parts like files. Each part travels in a call of its own, and `session_real_em.sh`
merges every `d_pN` back into `d` on the machine, and a file's chunks back into the file once all have come. Old parts
are replaced; `d` stays as it is.
Prints what each folder or part leaves.
    python3 kernels/split_carry.py data_em_a data_em_s data_em_d data_em_e
"""
import argparse, math, os, shutil, subprocess, sys
from pathlib import Path

CARRY = 64 * 2**20
MiB = 2**20


def files_of(d: Path):
    "(relative path, bytes) of every file under `d`, largest first."
    fs = [(p.relative_to(d), p.stat().st_size) for p in d.rglob('*') if p.is_file()]
    return sorted(fs, key=lambda f: (-f[1], str(f[0])))


def tree_bytes(root: Path) -> int:
    "Bytes of the files git tracks under `root`: what every call carries."
    out = subprocess.run(['git', 'ls-files', '-z'], cwd=root, capture_output=True, check=True).stdout
    return sum((root / f).stat().st_size for f in out.decode().split('\0') if f and (root / f).is_file())


def pieces(d: Path, room: int):
    """(path in a part, bytes, file of `d`, offset) of every file of `d`, largest first: the file whole, or, larger than
    `room`, cut into `k` near-equal chunks `<name>.part<j>of<k>`."""
    out = []
    for f, s in files_of(d):
        if s <= room: out.append((f, s, f, 0)); continue
        k = math.ceil(s / room); n = math.ceil(s / k)
        out += [(f.with_name(f'{f.name}.part{j + 1}of{k}'), min(n, s - j * n), f, j * n) for j in range(k)]
    return sorted(out, key=lambda p: (-p[1], str(p[0])))


def split(d: Path, room: int) -> list:
    "Parts of `d`, each at most `room` bytes (none if `d` fits): hard links to its files, or chunks of one too large."
    for old in d.parent.glob(f'{d.name}_p[0-9]*'): shutil.rmtree(old)
    fs = pieces(d, room)
    total = sum(p[1] for p in fs)
    if total <= room: return []
    k = math.ceil(total / room)
    while True:                                      # largest file first into the emptiest part; one more if over
        bins = [[0, []] for _ in range(k)]
        for piece in fs:
            b = min(bins, key=lambda b: b[0]); b[0] += piece[1]; b[1].append(piece)
        if max(b[0] for b in bins) <= room: break
        k += 1
    parts = []
    for i, (_, names) in enumerate(bins, 1):
        part = d.parent / f'{d.name}_p{i}'
        for name, n, f, at in names:
            (part / name).parent.mkdir(parents=True, exist_ok=True)
            if name == f: os.link(d / f, part / name)
            else:
                with open(d / f, 'rb') as src: src.seek(at); (part / name).write_bytes(src.read(n))
        parts.append(part)
    return parts


def size(d: Path) -> int: return sum(s for _, s in files_of(d))


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('folders', nargs='+', type=Path)
    p.add_argument('--margin-mib', type=float, default=1., help='room kept free in every call (MiB)')
    p.add_argument('--room-mib', type=float, default=None, help='room a call leaves (default: 64 MiB less the tree)')
    a = p.parse_args()
    root = Path(__file__).resolve().parent.parent
    tree = tree_bytes(root)
    room = int(a.room_mib * MiB) if a.room_mib else CARRY - tree - int(a.margin_mib * MiB)
    print(f"tree {tree / MiB:.1f} MiB; a call leaves {room / MiB:.1f} MiB for what it carries")
    for d in a.folders:
        if not d.is_dir(): sys.exit(f"{d}: no such folder")
        parts = split(d, room)
        for x in parts or [d]: print(f"  carry {x} ({size(x) / MiB:.1f} MiB)")
