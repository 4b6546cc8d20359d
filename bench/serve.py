"""uvicorn as the benchmarks run it: one worker, uvloop, no access log, with the token service's
bounded HTTP protocol (speechgate/token_service/http.py, what production runs) or uvicorn's plain httptools.

    python -m bench.serve TARGET PORT [--factory] [--http bounded|httptools]
"""

from __future__ import annotations

import argparse

import uvicorn

from speechgate.token_service.http import BoundedHttpToolsProtocol


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("target")
    parser.add_argument("port", type=int)
    parser.add_argument("--factory", action="store_true")
    parser.add_argument("--http", choices=["bounded", "httptools"], default="bounded")
    args = parser.parse_args()
    uvicorn.run(
        args.target,
        host="127.0.0.1",
        port=args.port,
        factory=args.factory,
        loop="uvloop",
        http=BoundedHttpToolsProtocol if args.http == "bounded" else "httptools",
        access_log=False,
        log_level="info",
        timeout_graceful_shutdown=1,
    )


if __name__ == "__main__":
    main()
