"""schemathesis generates requests from /openapi.json against a real server: no answer may be a 5xx."""

import asyncio
import shutil
import sys
from pathlib import Path

import pytest

from indexer.web.app import create_app

pytestmark = pytest.mark.integration
SCHEMATHESIS = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")


async def test_generated_requests_get_no_server_error(aiohttp_server, node, tmp_path):
    server = await aiohttp_server(create_app(node, consume=False))
    process = await asyncio.create_subprocess_exec(
        SCHEMATHESIS,
        "run",
        f"http://127.0.0.1:{server.port}/openapi.json",
        "--checks",
        "not_a_server_error,status_code_conformance",
        "--max-examples",
        "25",
        "--request-timeout",
        "30",
        "--suppress-health-check",
        "all",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 600)
    text = output.decode(errors="replace")
    assert process.returncode == 0, text[-6000:]
    assert "No issues found" in text or "passed" in text, text[-3000:]
