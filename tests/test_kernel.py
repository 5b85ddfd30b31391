"""course_utils.kernel: a widget's sync on the shell channel never hides a cell's reply from nbclient."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import nbformat
import pytest
import zmq
import zmq.asyncio
from jupyter_client.channels import AsyncZMQSocketChannel
from jupyter_client.session import Session
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_notebook

from course_utils import grade
from course_utils.kernel import GradingKernelClient, RearmingShellChannel, client_options

CHAPTER = "01_logits_softmax_cross_entropy"


def reply_is_missed(channel_class: type[AsyncZMQSocketChannel]) -> bool:
    """Replay nbclient's race on a socket pair: True if ``get_msg`` sleeps past a reply it holds.

    nbclient waits in ``shell_channel.get_msg`` for the execute_reply; the reply arrives
    while its loop is busy with an Output widget's display, and the widget's state sync
    is then sent on the same shell socket before the loop polls again.
    """

    async def race() -> bool:
        session = Session(key=b"secret")
        kernel = zmq.Context.instance().socket(zmq.ROUTER)
        frontend = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        try:
            port = kernel.bind_to_random_port("tcp://127.0.0.1")
            frontend.connect(f"tcp://127.0.0.1:{port}")
            shell = channel_class(frontend, session)
            shell.send(session.msg("execute_request", {"code": "interact(f)"}))
            ident, _ = session.recv(kernel, mode=0)
            waiting = asyncio.ensure_future(shell.get_msg(timeout=10))
            await asyncio.sleep(0.05)  # get_msg is now polling the socket
            session.send(kernel, "execute_reply", {"status": "ok"}, ident=ident)
            time.sleep(0.1)  # the loop is busy: the reply lands, its wake-up is pending
            shell.send(session.msg("comm_msg", {"data": {"method": "update"}}))
            try:
                await asyncio.wait_for(waiting, 1)
            except TimeoutError:
                return True
            return False
        finally:
            frontend.close(linger=0)
            kernel.close(linger=0)

    return asyncio.run(race())


def test_a_widget_sync_does_not_hide_the_reply() -> None:
    assert not reply_is_missed(RearmingShellChannel)


def test_the_plain_channel_misses_it() -> None:
    # The mechanism itself: without the re-check, the reply waits for the poll's timeout.
    if not reply_is_missed(AsyncZMQSocketChannel):
        pytest.skip(
            "this pyzmq and jupyter_client no longer lose the wake-up; course_utils.kernel may go"
        )


def test_notebook_clients_get_the_rearming_channel() -> None:
    client = NotebookClient(new_notebook(), kernel_name="python3", **client_options())
    kc = client.create_kernel_manager().client()
    assert isinstance(kc, GradingKernelClient)
    assert kc.shell_channel_class is RearmingShellChannel


@pytest.mark.slow
def test_interact_cells_never_hang_the_grader(tmp_path: Path) -> None:
    # Each cell sends a large output into an interact's Output widget: without the fix,
    # most of them race (about 3 in 4 here) and the first lost reply times the notebook out
    # With it, this notebook is graded in about 12 s on 2 busy cores.
    setup = (
        "import ipywidgets as widgets\n"
        "from IPython.display import display\n"
        "PAYLOAD = 'x' * 2_000_000\n"
        "def show(n=1):\n"
        "    display({'text/plain': PAYLOAD}, raw=True)"
    )
    cell = "widgets.interact(show, n=widgets.IntSlider(value=1));"
    nb = new_notebook(cells=[new_code_cell(setup)] + [new_code_cell(cell) for _ in range(8)])
    path = tmp_path / f"{CHAPTER}.ipynb"
    nbformat.write(nb, path)
    result = grade.grade_notebook(path, timeout=45, chapter=CHAPTER)
    assert result.status == "graded", result.message
