"""What a run leaves on disk, written as it happens so that a crash loses nothing already finished.

    config.yaml      the resolved configuration
    status.json      {"state": "running" | "complete" | "failed", "rounds_done": k, ...}; a killed run stays "running"
    results.jsonl    one line per round x client x attack ("kind": "attack"), and per fault ("kind": "fault")
    rounds.jsonl     one line per round: global test accuracy and loss, replies, faults, privacy spent
    grids/*.png      originals above reconstructions, for the first clients of the first and last round
                     (reconstructions alone when the run has no ground truth, as in deployment)
    reconstructions/*.pt   the same reconstructions as tensors: {"inputs": (b, *shape) model space, "labels"}
    .fedsim.lock     held (flock) by the process running the run: a second run into the directory refuses

One run, one directory: a run locks its directory for as long as it runs, and a new run into a directory that
holds an old one replaces everything of it (`clear_run_dir`), so no directory mixes two runs.

Every line is flushed when written (a crashed process loses nothing written) and synced to disk at most once a
second while the run goes, and at its end; status.json is replaced atomically after every round.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import socket
import time
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsim.errors import ConfigError, RunDirInUse
from fedsim.metrics import EXACT_TOLERANCE, SCORE_COLUMNS, match, relative_error
from fedsim.processes import process_alive

SYNC_SECONDS = 1.0  # while a run goes, lines are synced to disk at most this often

STATUS_FILE, RESULTS_FILE, ROUNDS_FILE, CONFIG_FILE, GRID_DIR, RECONSTRUCTION_DIR = (
    "status.json", "results.jsonl", "rounds.jsonl", "config.yaml", "grids", "reconstructions")
LOCK_FILE = ".fedsim.lock"
# Everything a run (and Hydra, and the trackers) writes into its directory: what a new run replaces.
RUN_OUTPUTS = (STATUS_FILE, STATUS_FILE + ".tmp", RESULTS_FILE, ROUNDS_FILE, CONFIG_FILE, GRID_DIR,
               RECONSTRUCTION_DIR, ".hydra", "tensorboard", ".write-test")

_held: dict[Path, int] = {}  # run directories this process has locked -> the lock file's descriptor


def lock_run_dir(directory: str | os.PathLike) -> None:
    """Lock `directory` for this process (created if needed) until `unlock_run_dir` or the process ends.

    Raises RunDirInUse, naming the holder's pid, when another process holds it. Never writes anything into a
    directory it cannot lock."""
    path = Path(directory).absolute()
    if path in _held:
        return
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunDirInUse(f"{path} is in use by another fedsim run (pid {holder}): wait for it to end or choose "
                          "another directory") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[path] = fd


def unlock_run_dir(directory: str | os.PathLike) -> None:
    fd = _held.pop(Path(directory).absolute(), None)
    if fd is not None:
        os.close(fd)  # releases the flock; the file stays (removing it would race with a waiting locker)


def clear_run_dir(directory: str | os.PathLike) -> None:
    """Remove every output of an earlier run from `directory` (which this process has locked); other files stay."""
    path = Path(directory)
    if not path.is_dir():
        return
    for entry in path.iterdir():
        if entry.name in RUN_OUTPUTS or (entry.suffix == ".log" and entry.is_file()):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def clean(value: Any) -> Any:
    """JSON-safe: NaN/inf -> None, tensors and numpy scalars -> Python numbers, tuples -> lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, torch.Tensor):
        return clean(value.tolist())
    if hasattr(value, "item") and callable(value.item):
        return clean(value.item())
    return value


class ResultsWriter:
    """Appends records to a run directory, flushing every line."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        self._status: dict[str, Any] = {}
        self._synced = float("-inf")

    def start(self, config_yaml: str, rounds_total: int) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        probe = self.dir / ".write-test"
        try:
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise ConfigError("hydra.run.dir", str(self.dir), f"a writable directory ({err.strerror})") from None
        for name in (RESULTS_FILE, ROUNDS_FILE):
            (self.dir / name).unlink(missing_ok=True)
        for name in (GRID_DIR, RECONSTRUCTION_DIR):  # a re-run job keeps nothing of its last try
            shutil.rmtree(self.dir / name, ignore_errors=True)
        (self.dir / CONFIG_FILE).write_text(config_yaml)
        self._status = {"state": "running", "rounds_done": 0, "rounds_total": rounds_total,
                        "started_at": time.time(), "pid": os.getpid(), "host": socket.gethostname()}
        self._write_status()

    def record(self, row: Mapping[str, Any]) -> None:
        self._append(RESULTS_FILE, row)

    def round(self, row: Mapping[str, Any]) -> None:
        self._append(ROUNDS_FILE, row)
        self._status["rounds_done"] = max(self._status.get("rounds_done", 0), int(row.get("round", 0)))
        # An fsync costs ~4.5 ms per file on a busy disk: fine for rounds of seconds, a tenth of a 10-client round
        # of 0.1 s. Lines are synced at most every SYNC_SECONDS, and always at the end.
        if time.monotonic() - self._synced >= SYNC_SECONDS:
            self._sync(RESULTS_FILE, ROUNDS_FILE)
        self._write_status()

    def update_status(self, **fields: Any) -> None:
        """Further facts in status.json (e.g. warnings), written now."""
        self._status.update(fields)
        self._write_status()

    def finish(self, state: str = "complete", error: str | None = None) -> None:
        self._status.update(state=state, finished_at=time.time())
        if error:
            self._status["error"] = error
        self._sync(RESULTS_FILE, ROUNDS_FILE)
        self._write_status()

    def _append(self, name: str, row: Mapping[str, Any]) -> None:
        with open(self.dir / name, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(clean(row), sort_keys=False) + "\n")
            fh.flush()

    def _sync(self, *names: str) -> None:
        self._synced = time.monotonic()
        for name in names:
            path = self.dir / name
            if path.exists():
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())

    def _write_status(self) -> None:
        self._status["updated_at"] = time.time()
        tmp = self.dir / (STATUS_FILE + ".tmp")
        tmp.write_text(json.dumps(clean(self._status), indent=1))
        os.replace(tmp, self.dir / STATUS_FILE)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a JSONL file; a torn last line (the run was killed mid-write) is ignored."""
    rows = []
    p = Path(path)
    if not p.exists():
        return rows
    for line in p.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def read_status(directory: str | os.PathLike) -> dict:
    p = Path(directory) / STATUS_FILE
    return json.loads(p.read_text()) if p.exists() else {}


def run_state(directory: str | os.PathLike) -> str:
    """complete | failed | interrupted | invalid | running (its process is alive) | incomplete (it died) | missing."""
    status = read_status(directory)
    state = status.get("state")
    if state is None:
        return "missing"
    if state != "running":
        return state
    return "running" if process_alive(status.get("pid"), status.get("host")) else "incomplete"


def save_grid(path: str | os.PathLike, originals: torch.Tensor | None, reconstructions: torch.Tensor | None,
              title: str, captions: list[str] | None = None) -> None:
    """Originals (top row) above their matched reconstructions (bottom row). Pixels (b, C, H, W) in [0, 1].

    Vectors (b, n) are drawn as heat strips. `captions` go under each reconstruction (e.g. its PSNR). Without
    `originals` (no ground truth) the reconstructions are drawn alone, in the attack's order. Each row of up to
    16 images is one mosaic (one Axes per row, not per image: a grid of 32 images draws in ~0.2 s, not ~2 s).
    """
    import matplotlib  # heavy: matplotlib loads only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: matplotlib loads only when a figure is drawn

    rows = [("original", originals, None), ("recovered", reconstructions, captions)]
    if originals is None:
        if reconstructions is None:
            raise ValueError("save_grid needs originals or reconstructions")
        rows = rows[1:]
    b = max(x.shape[0] for _, x, _ in rows if x is not None)
    cols = min(b, 16)
    chunks = math.ceil(b / cols)
    size = (max(3.5, 1.1 * cols + 0.6), 1.25 * len(rows) * chunks + 0.5)
    fig, axes = plt.subplots(len(rows) * chunks, 1, figsize=size, squeeze=False)
    for chunk in range(chunks):
        part = slice(chunk * cols, (chunk + 1) * cols)
        for r, (label, images, notes) in enumerate(rows):
            ax = axes[chunk * len(rows) + r][0]
            ax.axis("off")
            if images is None or images[part].shape[0] == 0:
                continue
            _show_strip(ax, images[part], cols, notes[part] if notes else None)
            ax.text(-0.01, 0.5, label, transform=ax.transAxes, rotation=90, va="center", ha="right", fontsize=8)
    _finish(fig, path, title)


def _show_strip(ax, images: torch.Tensor, cols: int, captions: list[str] | None) -> None:
    """Up to `cols` images side by side in one Axes, 1/8 of an image apart, with captions below each."""
    x = images.detach().cpu().float()
    if x.dim() != 3 and x.dim() != 4:  # vectors: one heat strip each
        x = x.reshape(x.shape[0], 1, 1, -1)
        cmap, vmin, vmax = "coolwarm", None, None
    else:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        x = x.clamp(0, 1)
        cmap, vmin, vmax = ("gray" if x.shape[1] == 1 else None), 0, 1
    n, c, h, w = x.shape
    gap = max(1, w // 8)
    mosaic = torch.full((c, h, cols * (w + gap) - gap), float("nan"))
    for i in range(n):
        mosaic[:, :, i * (w + gap):i * (w + gap) + w] = x[i]
    if c == 1:
        shown = mosaic[0].numpy()
    else:
        shown = mosaic.permute(1, 2, 0).nan_to_num(1.0).numpy()
    ax.imshow(shown, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest", aspect="auto" if h == 1 else "equal")
    for i, caption in enumerate(captions or []):
        ax.text(i * (w + gap) + (w - 1) / 2, h - 0.5 + 0.12 * h, caption, ha="center", va="top", fontsize=7)


def _finish(fig, path: str | os.PathLike, title: str) -> None:
    import matplotlib.pyplot as plt  # heavy: matplotlib loads only when a figure is drawn

    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


class RunRecorder:
    """The hook's recorder for a fedsim run: JSONL records, image grids and the console, as rounds finish."""

    def __init__(self, writer: ResultsWriter, *, run_info: Mapping[str, Any], rounds: int, grid_clients: int = 2,
                 grid_every_round: bool = False, console: Any = None,
                 grid_rounds: tuple[int, ...] | None = None) -> None:
        self.writer = writer
        self.info = dict(run_info)           # attack-independent columns: defense, seed, ...
        self.rounds = rounds
        self.grid_rounds = grid_rounds       # the rounds gridded (default: the first and the last)
        self.grid_clients = grid_clients
        self.grid_every_round = grid_every_round
        self.console = console
        self._pending_attacks: list[dict] = []
        self._pending_faults: list[dict] = []
        self._round_info: dict[str, Any] = {}
        self._gridded: dict[int, set[int]] = defaultdict(set)

    # -- hook.Recorder --------------------------------------------------------------------------------------------
    def on_attack(self, record, truth, meta) -> None:
        recon, scores = record.reconstruction, record.scores
        row = {"kind": "attack", "round": record.round, "client": record.client, "attack": record.attack,
               **self.info}
        for key in SCORE_COLUMNS:
            row[key] = getattr(scores, key) if scores is not None else None
        row["certified"] = recon.certified if recon is not None else None
        row["matching_loss"] = recon.matching_loss if recon is not None else None
        row["returned"] = int(recon.inputs.shape[0]) if recon is not None and recon.inputs is not None else 0
        row["recovered_labels"] = (recon.labels.tolist() if recon is not None and recon.labels is not None
                                   else None)
        row["seconds"] = record.seconds
        for key in ("psnr", "ssim", "exact"):   # fedsim.ceiling: the update's least-squares ceiling, where it applies
            row[f"ceiling_{key}"] = getattr(record.ceiling, key) if record.ceiling is not None else None
        row["stats"] = dict(recon.stats) if recon is not None else {}
        row["error"] = record.error
        self.writer.record(row)
        self._pending_attacks.append(row)
        if recon is not None and self._wants_grid(record.round, record.client):
            self._save_reconstruction(record)
            if truth is not None:
                self._grid(record, truth, meta)
            elif recon.inputs is not None and recon.inputs.shape[0] > 0:
                self._recovered_grid(record, meta)

    def on_fault(self, fault) -> None:
        row = {"kind": "fault", "round": fault.round, "client": fault.client, "node_id": fault.node_id,
               "fault": fault.kind, "detail": fault.detail, **self.info}
        self.writer.record(row)
        self._pending_faults.append(row)

    def on_round(self, server_round: int, info: Mapping[str, Any]) -> None:
        self._round_info.update(info)

    # -- server evaluation closes a round ----------------------------------------------------------------------
    def on_evaluate(self, server_round: int, evaluation: Mapping[str, Any]) -> None:
        row = {"round": server_round, **evaluation, **self._round_info, "faults": len(self._pending_faults),
               **self.info}
        row.setdefault("skipped", None)
        self.writer.round(row)
        if server_round > 0 and self.console is not None:
            self.console.round_done(server_round, evaluation, self._pending_attacks, self._pending_faults,
                                    row.get("skipped"))
        self._pending_attacks, self._pending_faults, self._round_info = [], [], {}

    # -- grids ------------------------------------------------------------------------------------------------------
    def _wants_grid(self, server_round: int, client: int) -> bool:
        if not self.grid_every_round and server_round not in (self.grid_rounds or (1, self.rounds)):
            return False
        done = self._gridded[server_round]
        if client in done or len(done) >= self.grid_clients:
            return False
        done.add(client)
        return True

    def _name(self, record, suffix: str) -> str:
        return f"round{record.round:03d}_client{record.client}_{record.attack}.{suffix}"

    def _title(self, record) -> str:
        defense = self.info.get("defense")
        return (f"{record.attack}, round {record.round}, client {record.client}"
                + (f", defense {defense}" if defense not in (None, "none") else ""))

    def _save_reconstruction(self, record) -> None:
        """The reconstruction itself, as the attack returned it (needs no ground truth)."""
        recon = record.reconstruction
        path = self.writer.dir / RECONSTRUCTION_DIR / self._name(record, "pt")
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"inputs": None if recon.inputs is None else recon.inputs.detach().cpu(),
                    "labels": None if recon.labels is None else recon.labels.detach().cpu()}, path)

    def _recovered_grid(self, record, meta) -> None:
        """No ground truth (deployment): the reconstructions alone, in pixel space."""
        inputs = record.reconstruction.inputs.detach().float()
        pixels = meta.normalization.to_pixels(inputs).reshape(inputs.shape[0], *meta.input_shape)
        save_grid(self.writer.dir / GRID_DIR / self._name(record, "png"), None, pixels, self._title(record) +
                  " (no ground truth)")

    def _grid(self, record, truth, meta) -> None:
        norm = meta.normalization
        truth_px = norm.to_pixels(truth.inputs)
        recon = record.reconstruction
        recon_px = None
        captions = None
        if recon.inputs is not None and recon.inputs.shape[0] > 0:
            raw = norm.to_pixels(recon.inputs.detach().float()).reshape(recon.inputs.shape[0], *truth_px.shape[1:])
            if record.scores is not None:  # the scorer's matching, not a second one
                rows = np.array([r for r, _ in record.scores.pairs], dtype=int)
                cols = np.array([c for _, c in record.scores.pairs], dtype=int)
            else:
                rows, cols = match(raw, truth_px)
            recon_px = torch.full_like(truth_px, 0.5)
            recon_px[torch.as_tensor(cols)] = raw[torch.as_tensor(rows)]
            per = record.scores.per_sample_psnr if record.scores is not None else ()
            found = record.scores.per_sample_identified if record.scores is not None else ()
            errors = relative_error(recon_px, truth_px)
            captions = []
            for i in range(truth_px.shape[0]):
                psnr_i = per[i] if i < len(per) else float("nan")
                mark = (" exact" if i in set(cols.tolist()) and errors[i] <= EXACT_TOLERANCE
                        else " id" if i < len(found) and found[i] else "")
                captions.append("-" if psnr_i != psnr_i else f"{psnr_i:.0f} dB{mark}")
        save_grid(self.writer.dir / GRID_DIR / self._name(record, "png"), truth_px, recon_px, self._title(record),
                  captions)
