"""The web dashboard: server-rendered pages (aiohttp-jinja2), live updates over Server-Sent
Events, charts drawn by the vendored uPlot. No build step: templates in hub/templates, static
files in hub/static.

    session.py  sign-in with an API token, the session cookie, sign-out
    pages.py    Dashboard, Jobs, Wallet, Nodes
    agents.py   the Agent Console: agents, the service directory, calling a service
    forms.py    form fields -> job specs and transfers, with messages per field
    live.py     latest events, heartbeat history, the /live event stream
    queries.py  read-only queries for pages and charts, and their indexes
    filters.py  template filters (times, sizes)
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC = Path(__file__).resolve().parent.parent / "static"


def agents_available(app: web.Application) -> bool:
    """The Agent Console appears when the hub has the agent registry (hub/agents.py)."""
    from hub.api.services import SERVICES

    return getattr(app[SERVICES], "agents", None) is not None


def add_routes(app: web.Application) -> None:
    import aiohttp_jinja2

    from hub.api.services import SERVICES
    from hub.web import filters, live, pages, queries, session

    queries.migrate(app[SERVICES].db)
    filters.install(aiohttp_jinja2.get_env(app), STATIC)
    live.setup(app)
    r = app.router
    r.add_get("/signin", session.signin_page)
    r.add_post("/signin", session.signin)
    r.add_post("/signout", session.signout)
    r.add_get("/", pages.dashboard)
    r.add_get("/jobs", pages.jobs_list)
    r.add_post("/jobs", pages.submit_job)
    r.add_get("/jobs/{job_id}", pages.job_page)
    r.add_get("/jobs/{job_id}/output", pages.job_output)
    r.add_get("/jobs/{job_id}/files/{path:.+}", pages.job_file)
    r.add_post("/jobs/{job_id}/cancel", pages.cancel_job)
    r.add_get("/wallet", pages.wallet_page)
    r.add_get("/wallet/history.csv", pages.wallet_csv)
    r.add_get("/wallet/chart.json", pages.wallet_chart)
    r.add_post("/wallet/transfer", pages.transfer)
    r.add_get("/nodes", pages.nodes_page)
    r.add_post("/nodes/token", pages.enrollment_token)
    r.add_get("/nodes/{node_id}", pages.node_page)
    r.add_get("/live", live.stream)
    if agents_available(app):
        from hub.web import agents

        agents.add_routes(app)
    r.add_static("/static", STATIC)
