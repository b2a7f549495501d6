"""minillm-teacher-serve: serve a teacher over HTTP, so that training never holds it in memory.

    MINILLM_TEACHER_TOKEN=$(openssl rand -hex 24) minillm-teacher-serve --model Qwen/Qwen2.5-7B-Instruct \\
        --dtype bf16 --device cuda:0 --host 0.0.0.0 --port 8001
    minillm-train --config ... teacher.server=http://teacher-node:8001   # same MINILLM_TEACHER_TOKEN exported

One process serves one model on one device, one batch at a time: run one per GPU (ports 8001, 8002, ...) and list
them all in teacher.server (a YAML list, or one comma-separated string). The trainer sends token ids and receives
the teacher's final hidden states; it applies the teacher's LM head itself (read from teacher.path), so its losses
are exact.

Security: the server binds to 127.0.0.1 unless --host says otherwise. With MINILLM_TEACHER_TOKEN set every request
must carry it (`Authorization: Bearer ...`); without it anyone who reaches the port can use the model, so listening
on another interface without a token is warned about. The token travels in clear text over plain HTTP: on an
untrusted network put the server behind TLS (a reverse proxy or an SSH tunnel).
"""

from __future__ import annotations

import argparse
import ipaddress
import os


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minillm-teacher-serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF hub id or local folder of the teacher")
    p.add_argument("--tokenizer", default=None, help="tokenizer hub id or folder (default: --model)")
    p.add_argument("--revision", default=None, help="hub revision of the model")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--max-batch-tokens", type=int, default=65536,
                   help="largest batch (rows x length) one request may send; larger ones get 413")
    p.add_argument("--trust-remote-code", action="store_true")
    return p


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.max_batch_tokens <= 0:
        raise SystemExit("minillm-teacher-serve: error: --max-batch-tokens must be positive")
    import torch
    import uvicorn

    from ..config import ModelConfig
    from ..models import load_model, load_tokenizer
    from ..serve.protocol import TOKEN_ENV
    from ..serve.server import TeacherScorer, build_app
    from ..tracking import get_logger

    log = get_logger()
    token = os.environ.get(TOKEN_ENV) or None
    if not _loopback(args.host) and token is None:
        log.warning("minillm-teacher-serve: listening on %s without %s: anyone who reaches this port can use the "
                    "model; export a token on both ends", args.host, TOKEN_ENV)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = ModelConfig(path=args.model, tokenizer=args.tokenizer, dtype=args.dtype, revision=args.revision,
                      trust_remote_code=args.trust_remote_code)
    model = load_model(cfg, trainable=False, device=device)
    scorer = TeacherScorer(model, load_tokenizer(cfg), model_path=args.model, revision=args.revision,
                           device=device, dtype=args.dtype)
    app = build_app(scorer, token=token, max_batch_tokens=args.max_batch_tokens, log=log)
    print(f"minillm-teacher-serve: serving {args.model} ({args.dtype}, {device}) on http://{args.host}:{args.port}"
          f"{' with a bearer token' if token else ''}", flush=True)
    # access_log off: per-request lines add nothing here (the token is in a header, never in a logged URL)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    from . import run_console

    run_console(main)
