"""The kernel client the grader drives nbclient with: one whose shell channel cannot miss a reply.

Why it exists. nbclient waits for a cell's ``execute_reply`` by polling the shell
socket (a ``zmq.asyncio`` socket: ``shell_channel.get_msg`` -> ``socket.poll``),
and while it waits it also handles the cell's IOPub messages. A cell that shows an
``ipywidgets.Output`` (every ``widgets.interact`` does) sends its output to that
widget, and nbclient's stand-in for the widget (``nbclient.output_widget.OutputWidget``)
syncs it back with a ``comm_msg`` on the *same* shell socket, from inside that IOPub
handler. ``jupyter_client.Session.send`` makes that send on a blocking shadow of the
asyncio socket. A ZeroMQ send first processes the socket's pending commands; if the
``execute_reply`` has just arrived, its "readable" command is consumed there, and
the socket's file descriptor, which only signals new commands (edge-triggered), is
cleared. ``zmq.asyncio`` re-checks ``ZMQ_EVENTS`` after its own sends, but this one
went around it, so the pending poll sleeps on with the reply already in the socket:
forever without a cell timeout, or until the timeout with one (the grader's child is
killed at the same moment, so the notebook is graded "timeout"). The kernel is idle
all the while. The reply only has to land while nbclient is busy with the widget's
output, so it happens often when that output is large (a figure) and never in a
notebook without an Output widget.

The fix is the one ZeroMQ prescribes for edge-triggered sockets: after a send, read
``ZMQ_EVENTS`` on the asyncio socket. ``zmq.asyncio`` then sees the waiting message
and wakes the poll. nbval is not affected: its blocking client polls with
``zmq_poll``, which checks ``ZMQ_EVENTS`` itself, and it never sends comm messages.
"""

from __future__ import annotations

from typing import Any

import zmq
from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.channels import AsyncZMQSocketChannel
from jupyter_client.manager import AsyncKernelManager
from traitlets import DottedObjectName, Type


class RearmingShellChannel(AsyncZMQSocketChannel):
    """A shell channel whose sends never hide an arrived reply from a pending ``get_msg``."""

    def send(self, msg: dict[str, Any]) -> None:
        """Send ``msg``, then let zmq.asyncio notice a reply that the send may have taken in."""
        super().send(msg)
        assert self.socket is not None
        # zmq.asyncio's get(EVENTS) reschedules its event handler when a message is waiting.
        self.socket.get(zmq.EVENTS)


class GradingKernelClient(AsyncKernelClient):
    """nbclient's usual asynchronous kernel client, with a ``RearmingShellChannel``."""

    shell_channel_class = Type(RearmingShellChannel)


class GradingKernelManager(AsyncKernelManager):
    """nbclient's usual kernel manager, handing out ``GradingKernelClient`` clients."""

    client_class = DottedObjectName("course_utils.kernel.GradingKernelClient")
    client_factory = Type(GradingKernelClient, klass=AsyncKernelClient)


def client_options() -> dict[str, Any]:
    """Keyword arguments for ``nbclient.NotebookClient`` so no cell waits on a reply it already has."""
    return {"kernel_manager_class": GradingKernelManager}
