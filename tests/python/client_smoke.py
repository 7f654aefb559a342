#!/usr/bin/env python3
"""Cross-language smoke test: drives a running denoised server through stubs that grpcio-tools
generates from proto/denoised/v1/denoised.proto, the same file the Rust crates use.

    .venv/bin/python tests/python/client_smoke.py --server 127.0.0.1:PORT --model NAME
    .venv/bin/python tests/python/client_smoke.py --check-stubs   # generate + import only

Checks ListModels, CreateSession (with a cache config), a streamed Generate (Started, one Step per
step in order, Completed with a PNG that decodes to the resolved size), GetSession,
CancelGeneration after the run, CloseSession, and NOT_FOUND for unknown session ids.
Every call has a deadline. Exits 0 on success, 1 with a message on the first failure.
"""

from __future__ import annotations

import argparse
import importlib
import io
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import grpc
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "proto"
PROTO_FILE = "denoised/v1/denoised.proto"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class SmokeFailure(Exception):
    """A check failed; the message says which and why."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SmokeFailure(message)


def log(message: str) -> None:
    print(f"client_smoke: {message}", flush=True)


def generate_stubs(out_dir: Path) -> tuple[ModuleType, ModuleType]:
    """Runs grpc_tools.protoc into out_dir and imports the generated modules."""
    from grpc_tools import protoc

    import grpc_tools

    # google/protobuf/timestamp.proto ships inside grpc_tools.
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        PROTO_FILE,
    ]
    if protoc.main(args) != 0:
        raise SmokeFailure(f"protoc failed on {PROTO_ROOT / PROTO_FILE}: {' '.join(args)}")
    # The stubs import each other as `denoised.v1.*`; put their root first on the path.
    sys.path.insert(0, str(out_dir))
    pb2 = importlib.import_module("denoised.v1.denoised_pb2")
    pb2_grpc = importlib.import_module("denoised.v1.denoised_pb2_grpc")
    check(
        hasattr(pb2_grpc, "DenoiserStub"),
        f"generated stubs in {out_dir} have no DenoiserStub",
    )
    return pb2, pb2_grpc


def cache_config(pb2: ModuleType, name: str):
    """The CacheConfig message for --cache."""
    if name == "none":
        return pb2.CacheConfig(none=pb2.NoCache())
    if name == "fbc":
        return pb2.CacheConfig(first_block_cache=pb2.FirstBlockCache(threshold=0.1))
    if name == "taylorseer":
        return pb2.CacheConfig(taylor_seer=pb2.TaylorSeer(cache_interval=2, max_order=1))
    raise SmokeFailure(f"unknown --cache {name}")


def expect_status(code: grpc.StatusCode, call, what: str) -> None:
    """Runs call() and checks it fails with status `code`."""
    try:
        call()
    except grpc.RpcError as err:
        check(
            err.code() == code,
            f"{what}: expected {code.name}, got {err.code().name}: {err.details()}",
        )
        return
    raise SmokeFailure(f"{what}: expected {code.name}, but the call succeeded")


def pick_size(model, requested: int | None) -> int:
    """The requested size, else the model's smallest size (at least one size multiple)."""
    if requested:
        return requested
    multiple = max(model.size_multiple, 1)
    smallest = max(model.size.min, multiple) if model.HasField("size") else 0
    # Round up to the multiple; 0 falls back to the model default.
    return -(-smallest // multiple) * multiple if smallest else 0


def generate_and_inspect(args, pb2: ModuleType, stub, model, sid: str) -> None:
    """Generate in the session, then GetSession and CancelGeneration on it."""
    timeout = args.timeout
    # Generate: Started, Step x N in order, Completed
    size = pick_size(model, args.size)
    request = pb2.GenerateRequest(
        session_id=sid,
        prompt="a small red cube on a table",
        width=size,
        height=size,
        steps=args.steps,
        seed=args.seed,
        preview=pb2.PreviewOptions(mode=pb2.PREVIEW_MODE_NONE),
    )
    started = None
    steps = []
    completed = None
    began = time.monotonic()
    for event in stub.Generate(request, timeout=args.generate_timeout):
        kind = event.WhichOneof("event")
        check(completed is None, f"{kind} event after Completed")
        if kind == "started":
            check(started is None and not steps, "Started is not the first event")
            started = event.started
        elif kind == "step":
            check(started is not None, "Step before Started")
            step = event.step
            check(step.index == len(steps), f"step index {step.index}, expected {len(steps)}")
            check(step.HasField("cache"), f"step {step.index} has no cache activity")
            steps.append(step)
        elif kind == "completed":
            completed = event.completed
        else:
            raise SmokeFailure(f"GenerateEvent without an event (oneof {kind})")
    check(started is not None, "no Started event")
    check(completed is not None, f"stream ended without Completed after {len(steps)} steps")
    settings = started.settings
    check(settings.seed == args.seed, f"resolved seed {settings.seed} != {args.seed}")
    check(
        settings.steps == args.steps,
        f"resolved steps {settings.steps} != requested {args.steps}",
    )
    check(len(steps) == settings.steps, f"{len(steps)} Step events for {settings.steps} steps")
    check(
        all(s.total == settings.steps for s in steps),
        f"step totals {[s.total for s in steps]} != {settings.steps}",
    )

    image = completed.image
    check(image.format == pb2.IMAGE_FORMAT_PNG, f"final image format {image.format}, not PNG")
    check(image.data.startswith(PNG_SIGNATURE), "final image bytes are not a PNG")
    decoded = Image.open(io.BytesIO(image.data))
    decoded.load()
    check(
        decoded.format == "PNG"
        and decoded.size == (image.width, image.height) == (settings.width, settings.height),
        f"PNG decodes to {decoded.format} {decoded.size}; message says "
        f"{image.width}x{image.height}, settings {settings.width}x{settings.height}",
    )
    log(
        f"ok: Generate {settings.width}x{settings.height}, {len(steps)} steps, "
        f"{completed.full_compute_steps} full-compute, "
        f"hit ratio {completed.cache_hit_ratio:.2f}, {time.monotonic() - began:.1f} s"
    )

    # GetSession and CancelGeneration on the now idle session
    info = stub.GetSession(pb2.GetSessionRequest(session_id=sid), timeout=timeout)
    check(info.session_id == sid, f"GetSession returned {info.session_id!r}")
    check(info.generations_run >= 1, f"generations_run {info.generations_run} after a run")
    log(f"ok: GetSession (generations_run {info.generations_run})")
    # Only the call is checked: `cancelled` may race with the server's end-of-run bookkeeping.
    cancel = stub.CancelGeneration(pb2.CancelGenerationRequest(session_id=sid), timeout=timeout)
    log(f"ok: CancelGeneration after the run (cancelled={cancel.cancelled})")


def run(args: argparse.Namespace, pb2: ModuleType, pb2_grpc: ModuleType) -> None:
    with grpc.insecure_channel(args.server) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=args.timeout)
        except grpc.FutureTimeoutError:
            raise SmokeFailure(
                f"cannot connect to {args.server} within {args.timeout} s"
            ) from None
        exercise_api(args, pb2, pb2_grpc.DenoiserStub(channel))


def exercise_api(args: argparse.Namespace, pb2: ModuleType, stub) -> None:
    """ListModels, a session's lifecycle with one generation, and NOT_FOUND checks."""
    timeout = args.timeout

    # ListModels
    models = stub.ListModels(pb2.ListModelsRequest(), timeout=timeout).models
    names = [m.name for m in models]
    check(args.model in names, f"model {args.model!r} not served (models: {names})")
    model = next(m for m in models if m.name == args.model)
    log(f"ok: ListModels ({len(models)} served; {model.name} is {model.family}/{model.variant})")

    # CreateSession with a cache config
    cache = cache_config(pb2, args.cache)
    session = stub.CreateSession(
        pb2.CreateSessionRequest(
            model=args.model,
            cache=cache,
            idle_timeout_seconds=120,
            labels={"client": "python-smoke"},
        ),
        timeout=timeout,
    )
    sid = session.session_id
    check(bool(sid), "CreateSession returned an empty session id")
    check(session.model == args.model, f"session model {session.model!r} != {args.model!r}")
    check(
        session.cache.WhichOneof("strategy") == cache.WhichOneof("strategy"),
        f"session cache {session.cache.WhichOneof('strategy')} != requested "
        f"{cache.WhichOneof('strategy')}",
    )
    check(session.labels.get("client") == "python-smoke", f"labels lost: {dict(session.labels)}")
    log(f"ok: CreateSession {sid} (cache {args.cache})")

    try:
        generate_and_inspect(args, pb2, stub, model, sid)
    except BaseException:
        # Best-effort close so the server drops the session's cache; the first error wins.
        try:
            stub.CloseSession(pb2.CloseSessionRequest(session_id=sid), timeout=timeout)
        except grpc.RpcError:
            pass
        raise
    closed = stub.CloseSession(pb2.CloseSessionRequest(session_id=sid), timeout=timeout)
    log(f"ok: CloseSession (freed {closed.freed_cache_bytes} bytes)")

    # NOT_FOUND for the closed id and for an id that never existed
    expect_status(
        grpc.StatusCode.NOT_FOUND,
        lambda: stub.GetSession(pb2.GetSessionRequest(session_id=sid), timeout=timeout),
        "GetSession on a closed session",
    )
    expect_status(
        grpc.StatusCode.NOT_FOUND,
        lambda: stub.GetSession(
            pb2.GetSessionRequest(session_id="no-such-session-0000"), timeout=timeout
        ),
        "GetSession on an unknown id",
    )
    expect_status(
        grpc.StatusCode.NOT_FOUND,
        lambda: stub.CloseSession(
            pb2.CloseSessionRequest(session_id="no-such-session-0000"), timeout=timeout
        ),
        "CloseSession on an unknown id",
    )
    log("ok: NOT_FOUND for unknown session ids")

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", help="host:port of a running denoised server")
    parser.add_argument("--model", help="model name to generate with")
    parser.add_argument(
        "--cache", choices=["none", "fbc", "taylorseer"], default="taylorseer",
        help="cache strategy of the session (default: taylorseer)",
    )
    parser.add_argument("--steps", type=int, default=3, help="denoising steps (default 3)")
    parser.add_argument("--seed", type=int, default=1234, help="noise seed (default 1234)")
    parser.add_argument(
        "--size", type=int, default=None,
        help="width and height (default: the model's smallest allowed size)",
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="deadline of each unary call in s (30)"
    )
    parser.add_argument(
        "--generate-timeout", type=float, default=600.0,
        help="deadline of the Generate stream in s (600)",
    )
    parser.add_argument(
        "--gen-dir", type=Path, default=None,
        help="where to write the stubs (default: a temporary directory, removed at exit)",
    )
    parser.add_argument(
        "--check-stubs", action="store_true",
        help="only generate and import the stubs, without a server",
    )
    args = parser.parse_args()
    if not args.check_stubs and not (args.server and args.model):
        parser.error("--server and --model are required (or use --check-stubs)")
    if args.steps < 1:
        parser.error("--steps must be at least 1")

    # A private temp dir by default: concurrent runs must not overwrite each other's stubs.
    gen_dir = args.gen_dir or Path(tempfile.mkdtemp(prefix="denoised-stubs-"))
    try:
        pb2, pb2_grpc = generate_stubs(gen_dir)
        log(f"ok: stubs generated and imported from {gen_dir}")
        if not args.check_stubs:
            run(args, pb2, pb2_grpc)
    except SmokeFailure as failure:
        print(f"client_smoke: FAIL: {failure}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - any gRPC or decode error is a failed smoke test
        import grpc

        if isinstance(err, grpc.RpcError):
            print(
                f"client_smoke: FAIL: RPC error {err.code().name}: {err.details()}",
                file=sys.stderr,
            )
        else:
            print(f"client_smoke: FAIL: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    finally:
        if args.gen_dir is None:
            shutil.rmtree(gen_dir, ignore_errors=True)
    log("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
