"""RestorePod unpacks each part's CRIU images while it makes the new sandbox, not at StartContainer.

Unpacking a part (its `checkpoint/` members, tens of MiB each) and making the new pod sandbox (a
pause process, CNI) are independent, and the second waits on other processes much of the time. So
once RestorePod has checked every part, it unpacks them side by side (one thread each) into a work
directory of its own while it makes the sandbox and the containers, waits for them before it
returns (until shortly before the caller's deadline: a part not done by then is left to
StartContainer, and its thread removes what it wrote), and hands each finished tree to its container: `<bundle>/checkpoint-prepared/`, with a
mark (`<bundle>/checkpoint-prepared.json`) naming the part file it came from. StartContainer then
moves the tree into place instead of unpacking (RestoreEngine, Restorer.unpack) -- only if the
part it opens is still that file (device, inode, size, mtime); otherwise the tree is dropped and
the part unpacked as before. Nothing of a part's content is trusted more for being unpacked early:
the same extraction (regular files and directories only, safe names, the size budget bounded by the
free space) made the tree, and everything StartContainer checks in the images it still checks.

Nothing is left behind:
- an unpack that fails is logged and dropped: StartContainer unpacks that part itself and reports
  what is wrong with it, as for any restore;
- RestorePod failing, or running out of time, discards the work directory (waiting for the threads);
- a handed-over tree lives in its container's directory, which goes with the container (a pod
  removed before its containers were started takes them along);
- a daemon killed meanwhile: the work directory is announced in the intent journal
  (Operation.UNPACK_POD_PARTS) before anything is written into it, and start-up recovery removes it.
  A tree already handed over is complete (it is renamed in whole, then marked), and a tree without
  its mark is never used.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from criu_glue.archive import open_archive
from oci.tree_removal import remove_tree
from pyshim.internal import crashpoints
from pyshim.internal.atomic import write_json_atomic
from pyshim.internal.intents import Intent, IntentJournal, Operation

log = logging.getLogger(__name__)

# While RestorePod makes the sandbox, the unpacks run at the lowest CPU priority: making a sandbox is a
# chain of processes that keeps about one core busy, and the unpacks are to use what is idle, not to
# slow it down (measured on 2 cores: at normal priority the sandbox took 150 ms instead of 45).
BACKGROUND_NICE = 19
PREPARED_DIR = "checkpoint-prepared"
PREPARED_MARK = "checkpoint-prepared.json"
MARK_VERSION = 1


@dataclass(frozen=True)
class PreparedImages:
    """A part's CRIU images, unpacked by RestorePod, ready to be moved into the restore's images dir."""
    path: Path
    image_bytes: int


def file_identity(st: os.stat_result) -> list[int]:
    """What says a part file is still the one that was unpacked."""
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


# ---- the mark: writer and reader -------------------------------------------------------------


def write_mark(bundle: Path, source: Path, identity: list[int], image_bytes: int) -> None:
    write_json_atomic(bundle / PREPARED_MARK, {"version": MARK_VERSION, "source": str(source),
                                               "identity": identity, "imageBytes": image_bytes}, mode=0o600)


def take_prepared(bundle: Path, source: Path, st: os.stat_result) -> PreparedImages | None:
    """StartContainer: the tree RestorePod unpacked from `source` (whose open file has stat `st`), or
    None when there is none usable -- then whatever is there is removed and the caller unpacks. The
    mark is consumed either way: a tree is used at most once."""
    mark, images = bundle / PREPARED_MARK, bundle / PREPARED_DIR
    try:
        doc = json.loads(mark.read_text())
    except FileNotFoundError:
        doc = None
    except (OSError, ValueError) as e:
        log.warning("unreadable mark of a prepared checkpoint; unpacking again", extra={"mark": str(mark),
                                                                                      "error": str(e)})
        doc = None
    mark.unlink(missing_ok=True)
    usable = (isinstance(doc, dict) and doc.get("version") == MARK_VERSION and doc.get("source") == str(source)
              and doc.get("identity") == file_identity(st) and isinstance(doc.get("imageBytes"), int)
              and images.is_dir())
    if not usable:
        if doc is not None:
            log.info("the part changed since RestorePod unpacked it; unpacking it again",
                     extra={"source": str(source)})
        remove_tree(images, ignore_errors=True)
        return None
    return PreparedImages(images, doc["imageBytes"])


# ---- RestorePod: unpack side by side, hand over -----------------------------------------------


@dataclass
class _Part:
    source: Path
    dest: Path
    identity: list[int] | None = None
    image_bytes: int = 0
    error: str = ""
    done: bool = False
    tid: int = 0  # the unpacking thread's kernel id (its CPU priority is changed)


class PodUnpack:
    """The parts of one RestorePod being unpacked (see the module docstring). Either hand_over() or
    discard() ends it; both wait for the threads and close the intent."""

    def __init__(self, journal: IntentJournal, intent: Intent, work_dir: Path, parts: list[_Part], limits_for):
        self._journal, self._intent, self._work_dir = journal, intent, work_dir
        self._parts = parts
        self._limits_for = limits_for
        self._threads = [threading.Thread(target=self._unpack, args=(p,), name=f"pod-unpack-{i}", daemon=True)
                         for i, p in enumerate(parts)]
        self._ended = False
        self._nice_lock = threading.Lock()
        self._full_speed = False
        self.milliseconds = 0.0  # the slowest part's unpack
        self._started = time.perf_counter()
        for t in self._threads:
            t.start()

    def _unpack(self, part: _Part) -> None:
        with self._nice_lock:
            part.tid = threading.get_native_id()
            if not self._full_speed:
                _set_nice(part.tid, BACKGROUND_NICE)
        try:
            with open_archive(part.source, self._limits_for(self._work_dir)) as archive:
                part.identity = file_identity(archive.file_stat())
                part.image_bytes = archive.extract_checkpoint_images(part.dest, self._limits_for(self._work_dir))
        except Exception as e:  # noqa: BLE001 - StartContainer unpacks this part itself and reports it
            part.error = getattr(e, "message", str(e))
        self.milliseconds = max(self.milliseconds, round((time.perf_counter() - self._started) * 1000, 1))
        part.done = True

    def _join(self, until: float | None = None) -> None:
        for t in self._threads:
            t.join(None if until is None else max(0.0, until - time.monotonic()))

    def hand_over(self, bundles: list[Path], until: float | None = None) -> int:
        """Wait for the unpacks (until the monotonic time `until` at most: RestorePod's caller has a
        deadline), then give part i's tree to the container whose bundle is bundles[i]. Returns how many
        were handed over; a part that failed or was not done in time is logged and left to
        StartContainer (the threads still running then clean up after themselves)."""
        handed = 0
        try:
            with self._nice_lock:  # RestorePod now only waits for them: full speed
                self._full_speed = True
                for part in self._parts:
                    if part.tid and not part.done:
                        _set_nice(part.tid, 0)
            self._join(until)
            crashpoints.reached(f"{Operation.UNPACK_POD_PARTS.value}:hand_over")
            for part, bundle in zip(self._parts, bundles, strict=True):
                if not part.done or part.error or part.identity is None:
                    log.warning("RestorePod could not unpack a part ahead; StartContainer will",
                                extra={"part": str(part.source), "error": part.error or "not done in time"})
                    continue
                try:
                    os.rename(part.dest, bundle / PREPARED_DIR)
                    write_mark(bundle, part.source, part.identity, part.image_bytes)
                except OSError as e:  # e.g. another filesystem: StartContainer unpacks it instead
                    remove_tree(bundle / PREPARED_DIR, ignore_errors=True)
                    log.warning("RestorePod could not hand an unpacked part over",
                                extra={"part": str(part.source), "error": str(e)})
                    continue
                handed += 1
        finally:
            self._end()
        return handed

    def discard(self, until: float | None = None) -> None:
        """RestorePod failed: wait for the unpacks (until the monotonic time `until` at most; those still
        running then remove it all when they end) and remove everything they wrote."""
        if self._ended:
            return
        self._join(until)
        self._end()

    def _end(self) -> None:
        if self._ended:
            return
        self._ended = True
        if any(t.is_alive() for t in self._threads):  # given up waiting: the last unpack removes it all
            threading.Thread(target=self._remove_after_unpacks, name="pod-unpack-cleanup", daemon=True).start()
        else:
            self._remove()

    def _remove_after_unpacks(self) -> None:
        self._join()
        self._remove()

    def _remove(self) -> None:
        remove_tree(self._work_dir, ignore_errors=True)
        self._journal.finish(self._intent)


def _set_nice(tid: int, nice: int) -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError:  # (the thread ended meanwhile, or no CAP_SYS_NICE to raise it again): only speed
        pass


class PodUnpacks:
    """The daemon's RestorePod unpacks: their work directories under `work_root`, and their recovery."""

    def __init__(self, work_root: Path, journal: IntentJournal, limits_for):
        self._root = Path(work_root)
        self._journal = journal
        self._limits_for = limits_for  # Restorer.limits_for: the size budget, bounded by the free space

    def start(self, sandbox_name: str, sources: list[Path]) -> PodUnpack:
        """Start unpacking `sources` (checked parts) side by side; announced before anything is written."""
        self._root.mkdir(mode=0o700, parents=True, exist_ok=True)
        work_dir = self._root / f"{time.time_ns():020d}-{os.getpid()}-{threading.get_ident()}"
        intent = self._journal.begin(Operation.UNPACK_POD_PARTS, sandbox_name, step="unpack", work_dir=str(work_dir))
        try:
            work_dir.mkdir(mode=0o700)
            parts = [_Part(source, work_dir / str(i)) for i, source in enumerate(sources)]
            return PodUnpack(self._journal, intent, work_dir, parts, self._limits_for)
        except BaseException:
            remove_tree(work_dir, ignore_errors=True)
            self._journal.finish(intent)
            raise

    def recover(self, intents: list[Intent]) -> None:
        """At start-up: remove what RestorePods killed mid-unpack left. Idempotent."""
        for intent in intents:
            if intent.operation != Operation.UNPACK_POD_PARTS:
                continue
            work_dir = Path(intent.facts.get("work_dir", ""))
            if work_dir.parent == self._root:  # never a path outside our work root, whatever the file says
                remove_tree(work_dir, ignore_errors=True)
                log.warning("recovery: RestorePod was killed while unpacking its parts; removed its work "
                            "directory", extra={"pod": intent.target, "work_dir": str(work_dir)})
            self._journal.finish(intent)
