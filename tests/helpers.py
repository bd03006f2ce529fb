"""Shared by the tests: a small CNN, random-data training steps, the masked-weights-are-zero
and exact-resume checks, small image-folder datasets written to disk, and the sockets a
command's processes listen on, and a command prefix under which file permissions hold."""

import io
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn


def small_net(width=16):
    """Three convs and two linears: the middle ones are sparse by default."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * width, 4 * width),
        nn.ReLU(),
        nn.Linear(4 * width, 10),
    )


def train_steps(model, optimizer, sparsifier, steps, seed=0, batch=16, side=8):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(batch, 1, side, side, generator=gen)
        y = torch.randint(10, (batch,), generator=gen)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        sparsifier.step()


def masked_weights_are_zero(sparsifier):
    return all(bool((sparsifier.weights[n][~m] == 0).all()) for n, m in sparsifier.masks.items())


def assert_resume_is_exact(build, first_steps, second_steps):
    """Train `first_steps`, save model/optimizer/sparsifier, load them into freshly built
    objects (other seeds, other settings) and train `second_steps`: the weights and the
    sparsifier's state must equal an uninterrupted run's, bit for bit. `build(fresh)` returns
    (model, optimizer, sparsifier). Returns both runs' sparsifier states, for more checks."""

    def run(resume):
        torch.manual_seed(0)
        model, optimizer, sparsifier = build(fresh=False)
        train_steps(model, optimizer, sparsifier, first_steps, seed=1)
        if resume:
            state = (model.state_dict(), optimizer.state_dict(), sparsifier.state_dict())
            torch.manual_seed(123)
            model, optimizer, sparsifier = build(fresh=True)
            sparsifier.load_state_dict(state[2])  # first: a shrunk run's model is cut to its live channels
            model.load_state_dict(state[0])
            optimizer.load_state_dict(state[1])
        train_steps(model, optimizer, sparsifier, second_steps, seed=2)
        return model.state_dict(), sparsifier.state_dict()

    (w1, s1), (w2, s2) = run(False), run(True)
    assert s1["iteration"] == s2["iteration"] == first_steps + second_steps
    assert s1.keys() == s2.keys()
    for name in s1["masks"]:
        assert torch.equal(s1["masks"][name], s2["masks"][name])
    for key in w1:
        assert torch.equal(w1[key], w2[key]), key
    return s1, s2


def png(size=(12, 12), mode="RGB", seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.squeeze(2) if mode == "L" else pixels, mode).save(buffer, "PNG")
    return buffer.getvalue()


def image_tree(classes=("cat", "dog", "frog"), per_split=None, mode="RGB", top="", size=(12, 12)):
    """{relative path: bytes} of a small train/test image tree, optionally under a top folder."""
    per_split = per_split or {"train": 4, "test": 2}
    names = [
        f"{top}{split}/{name}/{i}.png"
        for split, count in per_split.items()
        for name in classes
        for i in range(count)
    ]
    return {name: png(size, mode, seed) for seed, name in enumerate(names)}


def write_tree(root: Path, tree: dict) -> Path:
    for name, content in tree.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    return root


def _listening_inodes() -> dict[str, str]:
    """Socket inode -> local address ('7F000001:1F90' style hex) of every listening TCP socket."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                found[fields[9]] = fields[1]
    return found


def _tree(root: int) -> list[int]:
    """`root` and every process descended from it (a job's setsid does not hide it here)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The IP of a /proc/net/tcp{,6} local address (little-endian 32-bit words)."""
    host = bytes.fromhex(hex_address.split(":")[0])
    host = b"".join(host[i : i + 4][::-1] for i in range(0, len(host), 4))
    return ipaddress.ip_address(host)


def listening_addresses(pid: int, listening: dict[str, str]) -> list:
    """The IPs that process `pid` listens on, from a _listening_inodes() table."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    found = []
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        inode = target.removeprefix("socket:[").removesuffix("]")
        if target.startswith("socket:[") and inode in listening:
            found.append(address(listening[inode]))
    return found


def run_listening(command, timeout, **popen):
    """Run `command` to its end, sampling every 200 ms the TCP sockets that it or any process
    under it listens on. Returns (CompletedProcess, {IP address: command line of a holder})."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    seen: dict = {}
    done = threading.Event()

    def sample():
        while not done.is_set():
            listening = _listening_inodes()
            for pid in _tree(proc.pid):
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    continue
                for ip in listening_addresses(pid, listening):
                    seen[ip] = cmdline[:200]
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        done.set()
        sampler.join()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr), seen


def assert_loopback_only(seen: dict) -> None:
    """Some listener was seen (the job's stores), and every one is on 127.0.0.0/8 or ::1 (an
    IPv6 socket bound to an IPv4-mapped address is that IPv4 address)."""
    assert seen, "no listening socket seen at all: the sampling missed the job"
    wide = {
        str(ip): holder
        for ip, holder in seen.items()
        if not (getattr(ip, "ipv4_mapped", None) or ip).is_loopback
    }
    assert not wide, f"listening beyond loopback: {wide}"


# Root bypasses file permissions through these capabilities: without them (in the bounding set,
# so an exec cannot get them back) uid 0 is refused a chmod 000 file like any other user.
_DAC_CAPS = "-dac_override,-dac_read_search,-fowner"


def unprivileged() -> list[str] | None:
    """A command prefix under which file permissions are enforced on this process: nothing for
    a user that is not root; for root, `setpriv` without the capabilities that bypass them (uid
    0 stays, so the venv and the repo stay readable, which `nobody` often cannot reach under a
    0700 /root). None if neither works here (then skip): checked on a real chmod 000 file, and
    by importing dsrpipe under it."""
    if os.geteuid() != 0:
        prefix = []
    elif shutil.which("setpriv") is None:
        return None
    else:
        prefix = ["setpriv", f"--bounding-set={_DAC_CAPS}", f"--inh-caps={_DAC_CAPS}"]
    with tempfile.TemporaryDirectory() as tmp:
        secret = Path(tmp) / "secret"
        secret.write_text("x")
        secret.chmod(0)
        probe = f"import dsrpipe.cli\ntry:\n    open({str(secret)!r})\nexcept PermissionError:\n    print('denied')"
        try:
            result = subprocess.run(
                [*prefix, sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
            )
        except OSError:
            return None
    return prefix if result.returncode == 0 and result.stdout.strip() == "denied" else None


def sigint_as_a_terminal_sends_it() -> None:
    """preexec_fn of a child that a test sends SIGINT: a shell's background job (`pytest &`)
    starts with SIGINT ignored, and a child inherits that (dsrpipe keeps an ignored signal
    ignored, as nohup wants); the test means Ctrl-C at a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
