"""The live status page: what the daemon is doing now, for the admin listener.

:class:`StatusBoard` follows the workers' events (the jobs running here, their
progress and step, the recent failures and deferrals with their reasons) and, with
the spool's :class:`~.metrics.SpoolView`, the workers' snapshot and the SPS health
view, builds the document ``/status.json`` serves (:meth:`StatusBoard.document`).
``/status`` is :data:`PAGE`: one HTML page with a small inline script that polls
``status.json`` every two seconds and redraws; no external assets.

Neither shows a secret or PHI: every field is picked by name from the job records
(ids, kind, priority, attempts, times, error texts, which are token-redacted where they
are made), never a callback, a token, the request's input or context, the image info
or the slide metadata.  SPS addresses are shown without their query string.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable
from typing import Any

from attrs import define, field
from twisted.internet.interfaces import IReactorTime

from .._version import __version__
from ..jobs import Job, JobState
from ..workers.events import SupervisorEvent
from .metrics import Metrics, SpoolView

#: How many queued and deferred jobs, and recent failures, the page lists.
LISTED = 20


def _job(job: Job, now: float) -> dict[str, Any]:
    """The fields of a queued job the page shows (no token, no input, no PHI)."""
    return {
        "job_id": job.job_id,
        "slide_id": job.slide_id,
        "kind": job.kind.value,
        "priority": job.priority,
        "attempts": job.attempts,
        "age": round(max(0.0, now - job.created), 1),
    }


def _address(url: str) -> str:
    return url.split("?", 1)[0].split("#", 1)[0]


@define(eq=False)
class StatusBoard:
    """The status page's memory of the workers' events, and the document it serves.

    Collaborators: the ``clock``, the spool ``view``, ``workers`` (the supervisor's
    ``snapshot()``; None without workers), ``failing`` (the SPS health view's
    ``failing()``; None without workers) and the ``metrics`` (for the SPS request
    counts; None without).
    """

    clock: IReactorTime
    view: SpoolView
    workers: Any = None
    failing: Callable[[], dict[str, str]] | None = None
    metrics: Metrics | None = None
    started: float = field(default=0.0)
    running: dict[str, dict[str, Any]] = field(factory=dict)
    recent: collections.deque[dict[str, Any]] = field(
        factory=lambda: collections.deque(maxlen=LISTED)
    )

    def event(self, event: SupervisorEvent) -> None:
        """A workers' event: follow the running jobs and remember the failures."""
        job_id, detail, now = event.job_id, event.detail, self.clock.seconds()
        if job_id is None:
            return
        if event.kind == "job-started":
            self.running[job_id] = {
                "job_id": job_id,
                "worker": event.worker,
                "attempt": detail.get("attempt"),
                "started": now,
                "percent": 0,
                "step": "starting",
            }
        elif event.kind == "job-progress" and job_id in self.running:
            self.running[job_id]["percent"] = detail.get("percent", 0)
            self.running[job_id]["step"] = str(detail.get("text", ""))
        elif event.kind == "job-ended":
            self.running.pop(job_id, None)
            self._ended(job_id, detail, now)

    def _ended(self, job_id: str, detail: Any, now: float) -> None:
        state, deferral, error = detail.get("state"), detail.get("deferral"), detail.get("error")
        if state == JobState.FAILED.value:
            what = "failed"
        elif state == JobState.QUEUED.value and deferral == "error":
            what = "attempt failed, retried later"
        elif state == JobState.QUEUED.value and deferral is not None:
            what = f"deferred ({deferral})"
        else:
            return
        self.recent.appendleft({"job_id": job_id, "at": now, "what": what, "reason": error or ""})

    async def document(self) -> dict[str, Any]:
        """What ``/status.json`` answers (see the module docstring for what it leaves out)."""
        view = await self.view.refresh(jobs=True)
        now = self.clock.seconds()
        ready = [job for job in view.queued if job.ready(now)]
        waiting = sorted(view.deferred(), key=lambda job: job.not_before or 0.0)
        return {
            "service": "dpatia",
            "version": __version__,
            "pid": os.getpid(),
            "now": now,
            "uptime": round(max(0.0, now - self.started), 1),
            "spool": {
                "jobs": {state.value: view.counts.get(state, 0) for state in JobState},
                "free_bytes": view.room.free_bytes if view.room is not None else None,
                "oldest_queued_age": round(view.oldest_age(), 1),
            },
            "queue": [_job(job, now) for job in ready[:LISTED]],
            "deferred": [
                {
                    **_job(job, now),
                    "next_try_in": round(max(0.0, (job.not_before or now) - now), 1),
                    "why": job.deferral_kind.value if job.deferral_kind else None,
                    "reason": job.deferred_reason or job.last_error or "",
                }
                for job in waiting[:LISTED]
            ],
            "running": [
                {**run, "seconds": round(now - run["started"], 1)}
                for run in sorted(self.running.values(), key=lambda r: r["started"])
            ],
            "workers": self._workers(),
            "failures": [{**item, "ago": round(now - item["at"], 1)} for item in list(self.recent)],
            "sps": self._sps(),
        }

    def _workers(self) -> list[dict[str, Any]] | None:
        if self.workers is None:
            return None
        keep = ("slot", "worker", "state", "pid", "job", "jobs", "restart_delay")
        return [{name: slot.get(name) for name in keep} for slot in self.workers.snapshot()]

    def _sps(self) -> dict[str, Any]:
        failing = self.failing() if self.failing is not None else {}
        answers: dict[str, float] = {}
        if self.metrics is not None:
            for (name, labels), value in self.metrics.totals().items():
                if name == "dpatia_sps_requests":
                    answers[labels[1]] = answers.get(labels[1], 0) + value
        return {
            "healthy": not failing,
            "failing": [{"sps": _address(url), "reason": why} for url, why in failing.items()],
            "requests": answers,
        }


#: The page: a table per part, redrawn from ``status.json`` every two seconds.
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dpatia status</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.05em;margin:1.2em 0 .3em}
table{border-collapse:collapse;background:#fff;min-width:40%}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}th{background:#eee}
.bar{display:inline-block;height:10px;background:#4a8;vertical-align:middle}
.ok{color:#070}.bad{color:#b00;font-weight:bold}.muted{color:#777}
#tiles span{display:inline-block;margin-right:1.5em}
</style></head><body>
<h1>dpatia <span id="version"></span></h1>
<div class="muted" id="updated">loading…</div>
<div id="tiles"></div>
<h2>SPS</h2><div id="sps"></div>
<h2>Running</h2><div id="running"></div>
<h2>Workers</h2><div id="workers"></div>
<h2>Queue</h2><div id="queue"></div>
<h2>Deferred</h2><div id="deferred"></div>
<h2>Recent failures</h2><div id="failures"></div>
<script>
"use strict";
function esc(v){return String(v===null||v===undefined?"":v).replace(/[&<>"']/g,
  function(c){return {"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"}[c];});}
function table(id,rows,cols){
  var el=document.getElementById(id);
  if(!rows||!rows.length){el.innerHTML='<span class="muted">none</span>';return;}
  var h="<table><tr>"+cols.map(function(c){return "<th>"+esc(c[0])+"</th>";}).join("")+"</tr>";
  rows.forEach(function(r){h+="<tr>"+cols.map(function(c){
    return "<td>"+(c[2]?c[2](r):esc(r[c[1]]))+"</td>";}).join("")+"</tr>";});
  el.innerHTML=h+"</table>";}
function bytes(n){if(n===null)return "?";var u=["B","KiB","MiB","GiB","TiB"],i=0;
  while(n>=1024&&i<u.length-1){n/=1024;i++;}return n.toFixed(1)+" "+u[i];}
function draw(s){
  document.getElementById("version").textContent=s.version;
  document.getElementById("updated").textContent="updated "+new Date().toLocaleTimeString()+
    ", pid "+s.pid+", up "+Math.round(s.uptime)+" s";
  var j=s.spool.jobs,t="";
  ["queued","running","done","failed","cancelled"].forEach(function(k){
    t+="<span>"+k+": <b id=\\"count-"+k+"\\">"+j[k]+"</b></span>";});
  t+="<span>oldest queued: "+s.spool.oldest_queued_age+" s</span>";
  t+="<span>spool free: "+bytes(s.spool.free_bytes)+"</span>";
  document.getElementById("tiles").innerHTML=t;
  var sps=s.sps.healthy?'<span class="ok" id="sps-state">healthy</span>':
    '<span class="bad" id="sps-state">failing</span>';
  var req=Object.keys(s.sps.requests).sort().map(function(k){
    return esc(k)+": "+s.sps.requests[k];}).join(", ");
  req=req?' <span class="muted">requests '+req+"</span>":"";
  if(s.sps.failing.length){table("sps",s.sps.failing,[["SPS","sps"],["reason","reason"]]);
    document.getElementById("sps").insertAdjacentHTML("afterbegin",sps+req+"<br>");}
  else document.getElementById("sps").innerHTML=sps+req;
  table("running",s.running,[["job","job_id"],["worker","worker"],["attempt","attempt"],
    ["progress","percent",function(r){return '<span class="bar" style="width:'+
      Math.max(1,r.percent)+'px"></span> '+esc(r.percent)+" %";}],
    ["step","step"],["running for (s)","seconds"]]);
  if(s.workers===null){document.getElementById("workers").innerHTML=
    '<span class="muted">no workers in this daemon</span>';}
  else table("workers",s.workers,[["slot","slot"],["worker","worker"],["state","state"],
    ["pid","pid"],["job","job"],["jobs done","jobs"]]);
  table("queue",s.queue,[["job","job_id"],["slide","slide_id"],["kind","kind"],
    ["priority","priority"],["attempts","attempts"],["waiting (s)","age"]]);
  table("deferred",s.deferred,[["job","job_id"],["slide","slide_id"],["why","why"],
    ["next try in (s)","next_try_in"],["attempts","attempts"],["reason","reason"]]);
  table("failures",s.failures,[["job","job_id"],["what","what"],["reason","reason"],
    ["ago (s)","ago"]]);}
function poll(){
  fetch("status.json",{cache:"no-store"}).then(function(r){return r.json();}).then(draw)
    .catch(function(e){document.getElementById("updated").textContent="cannot reach the daemon: "+e;})
    .then(function(){setTimeout(poll,2000);});}
poll();
</script></body></html>
"""


__all__ = ["LISTED", "PAGE", "StatusBoard"]
