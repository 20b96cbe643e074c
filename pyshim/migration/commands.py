"""The CLI of moves: `pyshim migrate`, `pyshim node checkpoint-all`, `pyshim node restore-all`."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from oci.errors import ImageError
from oci.registry import Credentials
from pyshim.client import Client
from pyshim.migration import host_restart, lazy_move, pod_move
from pyshim.migration.migrate import DEFAULT_WORK_DIR, Migration, MigrateOptions, MigrationReport

DIRECT_IMAGE_REPOSITORY = "localhost/pyshim-migrate"  # the received image's name on the target
from pyshim.migration.workload import MoveError


def cmd_migrate(args) -> int:
    if args.status:
        return _print_status(args)
    if not args.source or not args.target:
        print("pyshim migrate: give --from ENDPOINT and --to ENDPOINT", file=sys.stderr)
        return 2
    if args.lazy and (args.pod or not args.container):
        print("pyshim migrate: --lazy moves one container (a lazy pod move is not built)", file=sys.stderr)
        return 2
    if args.stall is not None and not (args.lazy and args.stall > 0):
        print(f"pyshim migrate: --stall takes seconds above 0 ({args.stall:g} given), and only with --lazy",
              file=sys.stderr)
        return 2
    if args.pod or not args.container:
        return pod_move.cmd_migrate_pod(args)
    creds = None
    if args.creds:
        user, sep, password = args.creds.partition(":")
        if not sep:
            print("pyshim migrate: --creds takes USER:PASSWORD", file=sys.stderr)
            return 2
        creds = Credentials(username=user, password=password)
    if not args.repository and not args.direct:
        print("pyshim migrate: give --registry REGISTRY/REPO, or --direct COMMAND", file=sys.stderr)
        return 2
    options = MigrateOptions(container_id=args.container, source=args.source, target=args.target,
                             repository=args.repository or DIRECT_IMAGE_REPOSITORY, work_dir=Path(args.work_dir), insecure=args.insecure,
                             credentials=creds, keep_pod=args.keep_pod, verify_seconds=args.verify_seconds,
                             timeout=args.timeout, direct=args.direct or "",
                             archive_dir=Path(args.archive_dir) if args.archive_dir else None,
                             stall_seconds=MigrateOptions.stall_seconds if args.stall is None else args.stall)
    say = (lambda line: print(line, file=sys.stderr)) if args.json else print
    with Client(args.source, timeout=args.timeout) as source, Client(args.target, timeout=args.timeout) as target:
        try:
            migration = lazy_move.LazyMigration(options, source, target, _page_server(args), say=say) \
                if args.lazy else Migration(options, source, target, say=say)
            report = migration.rollback_only() if args.rollback else migration.run()
        except (MoveError, ImageError, OSError) as e:
            print(f"pyshim migrate: {e}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(report.to_json(), indent=1))
    elif args.rollback:
        print(f"rolled back the move of {args.container}")
    else:
        _print_report(report)
        if args.lazy and getattr(report, "lazy_pages", None):
            lazy = report.lazy_pages
            print(f"  pages     {lazy.get('lazyPagesCopiedBytes', 0) / (1 << 20):.1f} of "
                  f"{lazy.get('lazyPagesTotalBytes', 0) / (1 << 20):.1f} MiB pulled, all in place "
                  f"{lazy.get('lazyPagesMs')} ms after the target ran")
    return 0


def _page_server(args):
    return lazy_move.page_server_address(args.page_server) if args.page_server else None


def _print_status(args) -> int:
    """`pyshim migrate --status ID`: where a move in flight stands (the journal, the target's pages)."""
    try:
        status = lazy_move.status_of(Path(args.work_dir), args.status, timeout=args.timeout)
    except MoveError as e:
        print(f"pyshim migrate: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=1))
        return 0
    print(f"move of {status['container']} ({'lazy' if status['lazy'] else 'eager'}) from {status['from']} "
          f"to {status['to']}: {status['phase']}")
    if "lazyPages" in status:
        total, copied = status.get("lazyPagesTotalBytes") or 0, status.get("lazyPagesCopiedBytes") or 0
        print(f"  target {status.get('target_container', '')[:12]} {status.get('target_state', '')}: pages "
              f"{status['lazyPages']}, {copied / (1 << 20):.1f} of {total / (1 << 20):.1f} MiB"
              + (f" ({100 * copied / total:.0f}%)" if total else ""))
    elif "target_error" in status:
        print(f"  target: {status['target_error']}")
    return 0


def _print_report(report: MigrationReport) -> None:
    print(f"moved {report.source_container} -> container {report.target_container} in pod {report.target_pod}")
    print(f"  image     {report.image}")
    print(f"  tcp       {report.tcp or 'none'} (established: connections kept; close: reset, listeners kept)")
    if report.downtime_ms:
        print(f"  downtime  {report.downtime_ms:.0f} ms (frozen on the source to running on the target)")
    if report.archive_bytes:
        print(f"  archive   {report.archive_bytes / (1 << 20):.1f} MiB, transfer {report.transfer_mib_per_s} MiB/s")
    print("  phases (ms): " + ", ".join(f"{k} {v:.0f}" for k, v in report.phases_ms.items()))
    if report.checkpoint_phases_ms:
        print("  checkpoint on the source (ms): " +
              ", ".join(f"{k} {v:.0f}" for k, v in report.checkpoint_phases_ms.items()))
    if report.restore_phases_ms:
        print("  restore on the target (ms): " +
              ", ".join(f"{k} {v:.0f}" for k, v in report.restore_phases_ms.items()))


def cmd_node_checkpoint_all(args) -> int:
    with Client(args.endpoint, timeout=args.timeout) as client:
        outcome = host_restart.checkpoint_all(client, Path(args.dir), timeout=args.timeout)
    return _print_outcome("checkpointed", outcome)


def cmd_node_restore_all(args) -> int:
    with Client(args.endpoint, timeout=args.timeout) as client:
        outcome = host_restart.restore_all(client, Path(args.dir))
    return _print_outcome("restored", outcome)


def _print_outcome(verb: str, outcome: host_restart.Outcome) -> int:
    for line in outcome.done:
        print(f"{verb} {line}")
    for line in outcome.failed:
        print(f"FAILED {line}", file=sys.stderr)
    return 0 if outcome.ok else 1


def add_commands(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser(
        "migrate", help="move a running container to a new pod on another node",
        description="Checkpoint CONTAINER on the source node (it stops there), push the checkpoint image to "
                    "REPOSITORY, create its pod on the target node, restore it there, check that it runs, and "
                    "remove it from the source. A failure before it runs on the target restores it on the "
                    "source again; after a kill, run the same command again to finish or roll back. "
                    "Run it on the source node: the archive is written to --work-dir there.")
    m.add_argument("container", nargs="?", help="container id on the source node (or --pod)")
    m.add_argument("--pod", metavar="POD", help="move this whole pod instead: all its running containers, cut at "
                                                "one instant (CheckpointPod), restored together (RestorePod)")
    m.add_argument("--transfer-dir", metavar="DIR", help="with --pod: a directory the target node reads at the same "
                                                         "path, the pod checkpoint is copied there (default: the "
                                                         "work dir, which both nodes must then see)")
    m.add_argument("--from", dest="source", metavar="ENDPOINT", help="CRI endpoint of the source node")
    m.add_argument("--to", dest="target", metavar="ENDPOINT", help="CRI endpoint of the target node")
    m.add_argument("--lazy", action="store_true",
                   help="post-copy: the target runs the container before its memory arrives; pages are pulled "
                        "from the source's CRIU page server (needs --page-server; see the README)")
    m.add_argument("--page-server", metavar="ADDR[:PORT]",
                   help="with --lazy: the source node's numeric address the target reaches (a random port "
                        f"in {lazy_move.PAGE_SERVER_PORTS[0]}-{lazy_move.PAGE_SERVER_PORTS[1]} if none)")
    m.add_argument("--stall", type=float, metavar="SECONDS",
                   help="with --lazy: when no page arrives on the target for this long, the move is undone (the "
                        "target's container removed, the source thawed) rather than left waiting "
                        f"(default {MigrateOptions.stall_seconds:.0f})")
    m.add_argument("--status", metavar="CONTAINER", help="show where a move in flight stands (its journal in "
                                                         "--work-dir, the target's pages) and exit")
    m.add_argument("--direct", metavar="COMMAND",
                   help="stream the archive to the target instead of through a registry: a shell command that "
                        "runs `pyshim checkpoint-image receive` on the target node, e.g. "
                        "'ssh node-b pyshim checkpoint-image receive' (--registry then only names the image)")
    m.add_argument("--registry", dest="repository", metavar="REGISTRY/REPO",
                   help="where the checkpoint image goes, e.g. 10.0.0.1:5000/checkpoints (both nodes must reach it); "
                        "needed unless --direct")
    m.add_argument("--insecure", action="store_true", help="plain HTTP (or unverified HTTPS) to that registry")
    m.add_argument("--creds", metavar="USER:PASSWORD", help="registry credentials for the push")
    m.add_argument("--work-dir", default=DEFAULT_WORK_DIR, help="archives and the journal of unfinished moves")
    m.add_argument("--archive-dir", metavar="DIR",
                   help="where the source daemon writes the move's archive instead of --work-dir, e.g. a tmpfs: "
                        "the archive is needed only until the move ends (a rollback restores from it), and "
                        "in memory it costs no disk writes inside the downtime")
    m.add_argument("--keep-pod", action="store_true", help="keep the source pod even when it ends up empty")
    m.add_argument("--verify-seconds", type=float, default=1.0, help="how long it must run on the target")
    m.add_argument("--rollback", action="store_true", help="undo an unfinished move instead of finishing it")
    m.add_argument("--json", action="store_true", help="print the report as JSON")
    m.add_argument("--timeout", type=float, default=600, help="seconds per call")
    m.set_defaults(func=cmd_migrate)

    node = sub.add_parser("node", help="the whole node: checkpoint every container before a host restart, "
                                       "restore them after")
    node_sub = node.add_subparsers(dest="node_command", required=True)
    for name, func, text in (
            ("checkpoint-all", cmd_node_checkpoint_all,
             "checkpoint and stop every running container, record its pod, remove the saved pods"),
            ("restore-all", cmd_node_restore_all,
             "recreate the saved pods with their old names and addresses and restore their containers")):
        p = node_sub.add_parser(name, help=text, description=text + ".")
        p.add_argument("--endpoint", "-r", help="CRI endpoint (default $PYSHIM_ENDPOINT or unix:///run/pyshim/pyshim.sock)")
        p.add_argument("--dir", default=host_restart.DEFAULT_DIR, help="archives and their manifest")
        p.add_argument("--timeout", type=float, default=600, help="seconds per call")
        p.set_defaults(func=func)
