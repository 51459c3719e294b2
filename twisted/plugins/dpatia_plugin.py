"""twistd plugin: ``twistd -n dpatia``.  One lazy statement: nothing is imported at scan time."""

from twisted.application.service import ServiceMaker

dpatia = ServiceMaker(
    "dpatia",
    "dpatia_daemon.tap",
    "Sectra DPAT Image Analysis API server-side app daemon",
    "dpatia",
)
