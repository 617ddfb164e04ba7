"""What operators see: one model of the renderer's state, and the ways it is shown.

model.py     Status: the runner and the deliver stage report here; the Consul check,
             `/status`, the page and `consul-renderer status` read its snapshot; the metrics
served.py    what a template's live output holds (backends → servers) and what is left out
timeline.py  the last applies: keys changed, servers added/removed, runtime or reload and why
contact.py   the contact with Consul and the stale-data watchdog (max_data_age)
diff.py      the live file against the previous one, bounded, passwords hidden
server.py    the status server: the page (page.html), /status, /diff, /metrics, /health, /ready
"""

from renderer.status.contact import ConsulContact, ContactReader, Freshness
from renderer.status.model import Problem, Status
from renderer.status.served import Served
from renderer.status.server import StatusServer
from renderer.status.timeline import AppliedChange, ReloadWhy

__all__ = [
    "AppliedChange",
    "ConsulContact",
    "ContactReader",
    "Freshness",
    "Problem",
    "ReloadWhy",
    "Served",
    "Status",
    "StatusServer",
]
