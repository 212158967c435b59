"""Split data folders too large to travel beside the working tree into parts that do.

A device call carries 64 MiB in all: the tracked working tree plus the ignored paths it names. Each folder `d` larger
than the room that leaves (less `--margin-mib`) is split into parts `d_p1`, `d_p2`, … of the same layout (hard links
to its files, largest first into the emptiest part); each part travels in a call of its own, and
`session_real_em.sh` merges every `d_pN` back into `d` on the machine. Old parts are replaced; `d` stays as it is.
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


def split(d: Path, room: int) -> list:
    "Hard-linked parts of `d`, each at most `room` bytes (none if `d` fits); a file larger than `room` is an error."
    for old in d.parent.glob(f'{d.name}_p[0-9]*'): shutil.rmtree(old)
    fs = files_of(d)
    total = sum(s for _, s in fs)
    if total <= room: return []
    if fs[0][1] > room: sys.exit(f"{d / fs[0][0]}: {fs[0][1]} bytes, more than the {room} a call leaves")
    k = math.ceil(total / room)
    while True:                                      # largest file first into the emptiest part; one more if over
        bins = [[0, []] for _ in range(k)]
        for f, s in fs:
            b = min(bins, key=lambda b: b[0]); b[0] += s; b[1].append(f)
        if max(b[0] for b in bins) <= room: break
        k += 1
    parts = []
    for i, (_, names) in enumerate(bins, 1):
        part = d.parent / f'{d.name}_p{i}'
        for f in names:
            (part / f).parent.mkdir(parents=True, exist_ok=True)
            os.link(d / f, part / f)
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
