"""The daemon's HTTP side, run by the main process and by every extra front-door copy:
the Klein routes of the IA-API, the site, the background SPS writes that follow an
acknowledgement, the notification rules, and the extra front-door processes."""
