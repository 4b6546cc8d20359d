"""An ingress stand-in for the tests: TLS on 127.0.0.1:443 in front of the relay, bytes passed on
both ways. The JavaScript SDK's bare-host endpoints probe `https://<host>:443/…` whatever port the
app named, so only a listener on 443 shows what a production ingress in front of the relay sees."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from pathlib import Path

import trustme

PORT = 443


class TlsFront:
    """`with TlsFront(relay_port, tmp_path) as front:`; `front.ca_path` for NODE_EXTRA_CA_CERTS."""

    def __init__(self, target_port: int, directory: Path) -> None:
        self.target_port = target_port
        ca = trustme.CA()
        self.ca_path = directory / "front-ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_path))
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1", "localhost").configure_cert(self._context)
        self.requests: list[str] = []  # the request line of each connection through the front
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            server = await asyncio.start_server(self._pipe, "127.0.0.1", PORT, ssl=self._context)
        except OSError as exc:  # 443 taken, or no right to bind it
            self._error = exc
            self._ready.set()
            return
        async with server:
            self._ready.set()
            await self._stop.wait()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return

        async def copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ssl.SSLError):
                if source is reader:
                    line = await source.readline()
                    self.requests.append(line.decode("latin-1").strip())
                    sink.write(line)
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            with contextlib.suppress(OSError, RuntimeError):
                sink.close()

        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))

    def __enter__(self) -> TlsFront:
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise RuntimeError(f"the TLS front needs 127.0.0.1:{PORT}: {self._error}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
