"""`tilerunner` command line: a thin shell over config, pipeline and synthetic.

Errors print as one line `tilerunner: error: ...` on stderr with the exit code of their class
(config 2, model 3, slide 4, output 5, device 6, broker 7, internal 70, interrupted 130).
A full disk is an output error (5) naming the file, wherever it is raised.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from tilerunner import CONFIG_SCHEMA_VERSIONS, __version__
from tilerunner.errors import ConfigError, OutputError, RunnerError
from tilerunner.worker.topology import DEFAULT_DELIVERY_LIMIT

EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130


class ProgressBar:
    """tiles done/total and tiles/s on stderr: a redrawn bar on a terminal, lines otherwise."""

    def __init__(self, stream: TextIO, enabled: bool = True) -> None:
        self.stream = stream
        self.enabled = enabled
        self.tty = stream.isatty()
        self._last = 0.0
        self._last_pct = -1

    def __call__(self, p: Any) -> None:
        if not self.enabled:
            return
        if p.stage == "tissue":
            self._line(f"{p.analysis}: finding tissue...")
            return
        if p.stage == "writing":
            self._line(f"{p.analysis}: writing results...")
            return
        if p.stage != "tiles":
            return
        now = time.monotonic()
        rate = p.done / p.elapsed_s if p.elapsed_s > 0 else 0.0
        pct = int(100 * p.done / p.total) if p.total else 100
        if self.tty:
            if now - self._last < 0.2 and p.done < p.total:
                return
            width = 30
            fill = int(width * p.done / p.total) if p.total else width
            bar = "#" * fill + "." * (width - fill)
            self.stream.write(
                f"\r{p.analysis}: [{bar}] {p.done}/{p.total} tiles {rate:7.1f} tiles/s"
            )
            if p.done >= p.total:
                self.stream.write("\n")
            self.stream.flush()
        elif pct // 10 != self._last_pct // 10 or p.done >= p.total:
            self._line(f"{p.analysis}: {p.done}/{p.total} tiles ({pct}%), {rate:.1f} tiles/s")
            self._last_pct = pct
        self._last = now

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()


def _int_at_least(low: int) -> Any:
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}")
        return value

    return parse


def _seconds(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0 seconds")
    return value


def _env_paths(name: str, default: str) -> list[Path]:
    """Folders from $NAME (separated by ':'), else `default`."""
    raw = os.environ.get(name, "").strip() or default
    return [Path(p) for p in raw.split(os.pathsep) if p.strip()]


def _worker_parser(sub: Any, common: Any) -> None:
    """`tilerunner worker`: options of the service mode (see tilerunner/worker/)."""
    wk = sub.add_parser("worker", help="analyse slides as jobs arrive on a RabbitMQ queue")
    common(wk)
    _broker_options(wk)
    wk.add_argument(
        "--slide-root",
        dest="slide_roots",
        type=Path,
        action="append",
        default=None,
        metavar="DIR",
        help="a folder job slides may come from (repeat for several; symlinks are resolved "
        "and a slide outside every one is refused; default: $TILERUNNER_SLIDE_ROOTS, "
        "':'-separated, else /slides)",
    )
    wk.add_argument(
        "--output-root",
        type=Path,
        default=_env_paths("TILERUNNER_OUTPUT_ROOT", "/out")[0],
        metavar="DIR",
        help="the folder every job output must lie in (default: $TILERUNNER_OUTPUT_ROOT "
        "else /out); it also holds the job locks",
    )
    _attempt_options(wk)
    wk.add_argument(
        "--metrics-port",
        type=_int_at_least(0),
        default=9464,
        help="HTTP port of /metrics, /healthz, /readyz (0: none)",
    )
    wk.add_argument("--metrics-host", default="0.0.0.0", help="address of that port")
    wk.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    wk.add_argument("--batch-size", type=_int_at_least(1), default=32)
    wk.add_argument("--workers", type=int, default=None, help="tile reader threads")
    wk.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU inference threads, each running its share of a batch (0: one per core)",
    )
    wk.add_argument("--reader", choices=("auto", "openslide"), default="auto")
    wk.add_argument("--decoder", choices=("auto", "cpu", "nvimgcodec"), default="auto")
    wk.add_argument("--log-format", choices=("json", "text"), default="json")


def _broker_options(wk: argparse.ArgumentParser) -> None:
    wk.add_argument(
        "--amqp",
        default=os.environ.get("TILERUNNER_AMQP_URL"),
        help="broker URL amqp://user:password@host:5672/vhost "
        "(default: $TILERUNNER_AMQP_URL, which keeps the password off the command line)",
    )
    wk.add_argument(
        "--queue",
        default=os.environ.get("TILERUNNER_QUEUE", "tilerunner.jobs"),
        help="job queue; NAME.results, NAME.dead and NAME.undelivered go with it "
        "(default: $TILERUNNER_QUEUE or tilerunner.jobs)",
    )
    wk.add_argument(
        "--prefetch",
        type=_int_at_least(1),
        default=1,
        help="jobs held from the broker at once (run one at a time)",
    )
    wk.add_argument(
        "--broker-timeout",
        type=_seconds,
        default=300.0,
        help="exit (code 7) after this many seconds without a broker connection",
    )


def _attempt_options(wk: argparse.ArgumentParser) -> None:
    wk.add_argument(
        "--max-attempts",
        type=_int_at_least(1),
        default=3,
        help="attempts of a job that fail with an error before it is dead-lettered "
        "(counted by the workers; a broker restart or a lost connection is no failure)",
    )
    wk.add_argument(
        "--delivery-limit",
        type=_int_at_least(2),
        default=DEFAULT_DELIVERY_LIMIT,
        help="deliveries of a job that end with no answer at all (its worker died or lost "
        "the connection) before the broker gives up on it: the backstop for a slide that "
        "kills every worker; a queue argument, the same on every worker of a queue "
        f"(default {DEFAULT_DELIVERY_LIMIT})",
    )
    wk.add_argument(
        "--grace",
        type=_seconds,
        default=25.0,
        help="on SIGTERM, seconds the current job may take to finish before it is "
        "handed back to the queue",
    )
    wk.add_argument(
        "--retry-delay",
        type=_seconds,
        default=5.0,
        help="seconds before a failed attempt goes back to the queue",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tilerunner",
        description="Run the analyses of a verbose config on a whole-slide image.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"tilerunner {__version__} (config schemas "
        f"{','.join(map(str, CONFIG_SCHEMA_VERSIONS))})",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="errors only")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config",
            type=Path,
            default=None,
            help="verbose analysis config (default: <app dir>/config/analysis.yaml)",
        )
        p.add_argument(
            "--app-dir",
            type=Path,
            default=None,
            help="folder model references resolve against (default: $TILERUNNER_APP_DIR or /app)",
        )

    _run_parser(sub, common)

    val = sub.add_parser("validate", help="load the config and models, touch no slide")
    common(val)
    val.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")

    sub.add_parser(
        "info", help="versions, accepted config schemas, ONNX Runtime providers, CUDA status"
    )

    ct = sub.add_parser(
        "contract",
        help="the configs this runner accepts: plug-ins with their param schemas, config "
        "schema versions (JSON; the base image ships it as /opt/tilerunner/contract.json)",
    )
    ct.add_argument("--output", type=Path, default=None, help="write it here instead of stdout")
    ct.add_argument("--sha256", action="store_true", help="print only its sha256")

    _worker_parser(sub, common)

    _demo_parser(sub)
    return parser


def _run_parser(sub: Any, common: Any) -> None:
    """`tilerunner run`: options of analysing one slide."""
    run = sub.add_parser("run", help="analyse one slide")
    run.add_argument("slide", type=Path)
    common(run)
    run.add_argument("--out", type=Path, required=True, help="output folder")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    run.add_argument("--batch-size", type=int, default=32)
    run.add_argument("--workers", type=int, default=None, help="tile reader threads")
    run.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU inference threads, each running its share of a batch (0: one per core)",
    )
    run.add_argument(
        "--mpp",
        type=float,
        default=None,
        help="microns per pixel, for slides without resolution metadata",
    )
    run.add_argument(
        "--reader",
        choices=("auto", "openslide"),
        default="auto",
        help="auto: decode TIFF tiles directly when identical to OpenSlide",
    )
    run.add_argument(
        "--decoder",
        choices=("auto", "cpu", "nvimgcodec"),
        default="auto",
        help="who decodes JPEG tiles: auto: the GPU (nvImageCodec) when the models run on "
        "CUDA and its pixels equal the CPU's, else the CPU",
    )
    run.add_argument("--no-progress", action="store_true")
    run.add_argument("--json", action="store_true", help="print the run report as JSON")


def _demo_parser(sub: Any) -> None:
    """`tilerunner demo models|slide`: the demo models and synthetic slides (NOT clinical)."""
    demo = sub.add_parser("demo", help="write demo models or a synthetic slide (NOT clinical)")
    demo_sub = demo.add_subparsers(dest="what", required=True)
    dm = demo_sub.add_parser("models", help="write the demo ONNX models")
    dm.add_argument("out", type=Path)
    ds = demo_sub.add_parser("slide", help="write a synthetic slide and its ground truth")
    ds.add_argument("out", type=Path)
    ds.add_argument("--size", type=int, default=8192, help="level-0 width and height (px)")
    ds.add_argument("--seed", type=int, default=1)
    ds.add_argument("--mpp", type=float, default=0.25)
    ds.add_argument("--palette", choices=("A", "B"), default="A")
    ds.add_argument("--no-tissue", action="store_true")
    ds.add_argument("--no-pyramid", action="store_true")
    ds.add_argument("--compression", choices=("jpeg", "deflate"), default="jpeg")
    ds.add_argument("--vendor", choices=("generic", "aperio"), default="generic")
    ds.add_argument("--workers", type=int, default=1)


def _cmd_run(args: argparse.Namespace) -> int:
    from tilerunner.config import load_config
    from tilerunner.pipeline import RunOptions, default_workers, run

    config = load_config(args.config, args.app_dir)
    options = RunOptions(
        device=args.device,
        batch_size=args.batch_size,
        workers=default_workers() if args.workers is None else args.workers,
        threads=args.threads,
        mpp=args.mpp,
        reader=args.reader,
        decoder=args.decoder,
    )
    bar = ProgressBar(sys.stderr, enabled=not (args.no_progress or args.quiet))
    report = run(config, args.slide, args.out, options, bar)
    rate = report.tiles / report.seconds if report.seconds else 0.0
    logging.getLogger("tilerunner").info(
        "done: %d tiles in %.1f s (%.1f tiles/s) on %s; results in %s",
        report.tiles,
        report.seconds,
        rate,
        report.device,
        ", ".join(str(p) for p in report.analyses.values()),
    )
    if args.json:
        doc = {
            "device": report.device,
            "tiles": report.tiles,
            "seconds": round(report.seconds, 3),
            "analyses": {k: str(v) for k, v in report.analyses.items()},
        }
        print(json.dumps(doc, sort_keys=True))
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from tilerunner.config import load_config
    from tilerunner.models import EngineOptions, ModelStore

    config = load_config(args.config, args.app_dir)
    store = ModelStore(EngineOptions(device=args.device))
    store.load(config)
    doc = {
        "config": str(config.path),
        "customer": config.customer,
        "analyses": {a.name: sorted(a.models) for a in config.analyses},
        "models": {s.key[:12]: s.sha256 for s in store.sessions},
        "device": store.device,
    }
    print(json.dumps(doc, sort_keys=True))
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from tilerunner.config import load_config
    from tilerunner.pipeline import RunOptions, default_workers
    from tilerunner.worker.consumer import WorkerSettings
    from tilerunner.worker.logs import JsonLogFormatter, TextLogFormatter
    from tilerunner.worker.serve import serve

    if not args.amqp:
        raise ConfigError("worker: no broker URL; pass --amqp or set TILERUNNER_AMQP_URL")
    formatter = JsonLogFormatter() if args.log_format == "json" else TextLogFormatter()
    for handler in logging.getLogger("tilerunner").handlers:
        handler.setFormatter(formatter)
    config = load_config(args.config, args.app_dir)
    options = RunOptions(
        device=args.device,
        batch_size=args.batch_size,
        workers=default_workers() if args.workers is None else args.workers,
        threads=args.threads,
        reader=args.reader,
        decoder=args.decoder,
    )
    settings = WorkerSettings(
        amqp_url=args.amqp,
        queue=args.queue,
        prefetch=args.prefetch,
        max_attempts=args.max_attempts,
        delivery_limit=args.delivery_limit,
        grace_s=args.grace,
        retry_delay_s=args.retry_delay,
        broker_timeout_s=args.broker_timeout,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        slide_roots=tuple(args.slide_roots or _env_paths("TILERUNNER_SLIDE_ROOTS", "/slides")),
        output_root=args.output_root,
    )
    return serve(settings, config, options)


def _cmd_info(args: argparse.Namespace) -> int:
    import onnxruntime
    import openslide

    from tilerunner.cuda import cuda_status

    cuda = cuda_status()
    doc = {
        "tilerunner": __version__,
        "config_schemas": list(CONFIG_SCHEMA_VERSIONS),
        "onnxruntime": onnxruntime.__version__,
        "providers": onnxruntime.get_available_providers(),
        "cuda": cuda.as_dict(),
        "device_auto": "cuda" if cuda.usable else "cpu",
        "openslide": openslide.__library_version__,
        "openslide_python": openslide.__version__,
    }
    print(json.dumps(doc, sort_keys=True))
    return 0


def _cmd_contract(args: argparse.Namespace) -> int:
    from tilerunner.contract import contract_bytes, contract_sha256

    if args.sha256:
        print(contract_sha256())
    elif args.output:
        try:
            args.output.write_bytes(contract_bytes())
        except OSError as exc:
            raise OutputError(f"cannot write {args.output}: {exc.strerror}") from None
    else:
        sys.stdout.write(contract_bytes().decode())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.what == "models":
        from tilerunner.demo_models import write_demo_models

        for m in write_demo_models(args.out):
            print(f"{m.sha256}  {m.size:>8}  {m.path}")
        return 0
    from tilerunner.synthetic import make_slide

    truth = make_slide(
        args.out,
        width=args.size,
        seed=args.seed,
        mpp=args.mpp,
        palette=args.palette,
        tissue=not args.no_tissue,
        pyramid=not args.no_pyramid,
        compression=args.compression,
        vendor=args.vendor,
        workers=args.workers,
    )
    print(
        json.dumps(
            {
                "slide": str(args.out),
                "carcinoma_regions": len(truth["carcinoma"]),
                "mitoses": len(truth["mitoses"]),
                "levels": len(truth["levels"]),
            }
        )
    )
    return 0


def _setup_logging(level: int) -> None:
    """Our messages only (library loggers such as tifffile's stay quiet), on stderr."""
    log = logging.getLogger("tilerunner")
    for handler in list(log.handlers):
        log.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("tilerunner: %(message)s"))
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
    logging.getLogger("tifffile").setLevel(logging.CRITICAL)  # its errors become SlideError


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """`tilerunner ARGS`: run one command; its exit code (errors print as one line)."""
    args = _parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    _setup_logging(level)
    signal.signal(signal.SIGTERM, _on_sigterm)
    commands = {
        "run": _cmd_run,
        "validate": _cmd_validate,
        "info": _cmd_info,
        "contract": _cmd_contract,
        "demo": _cmd_demo,
        "worker": _cmd_worker,
    }
    code = _dispatch(commands[args.command], args)
    if _job_thread_alive():
        # a job thread that would not stop: leave without running the interpreter's exit
        # handlers, which abort (SIGABRT) while a thread is inside ONNX Runtime's native code
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _job_thread_alive() -> bool:
    consumer = sys.modules.get("tilerunner.worker.consumer")
    return consumer is not None and bool(consumer.job_thread_alive())


def _dispatch(command: Any, args: argparse.Namespace) -> int:
    """Run one command; errors become one line on stderr and the exit code of their class."""
    try:
        return int(command(args))
    except RunnerError as exc:
        print(f"tilerunner: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("tilerunner: interrupted; no results were written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            return _internal(exc, args.verbose)
        where = f" writing {exc.filename}" if exc.filename else ""
        print(
            f"tilerunner: error: {exc.strerror}{where} (the output disk is full); free space "
            "there or choose another --out",
            file=sys.stderr,
        )
        return OutputError.exit_code
    except Exception as exc:
        return _internal(exc, args.verbose)


def _internal(exc: Exception, verbose: bool) -> int:
    if verbose:
        raise exc
    text = " ".join(str(exc)[:2000].split())[:300]
    print(
        f"tilerunner: internal error: {type(exc).__name__}: {text} (rerun with -v)",
        file=sys.stderr,
    )
    return EXIT_INTERNAL
