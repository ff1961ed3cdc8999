"""``twistd towerws``: the IServiceMaker drop-in.  It only parses options and wires."""

from __future__ import annotations

import sys
from importlib import metadata

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer

from towerws import config


class Options(usage.Options):
    #: twistd's own options (--nodaemon, --logfile, ...), set by usage when run as a sub-command
    parent: usage.Options | None = None
    synopsis = "[options]"
    longdesc = (
        "Live-update websocket server for Ansible Tower / AWX. Each option can also be set "
        "in the config file (section [towerws], key = option with - as _) or as TOWERWS_<KEY>; "
        "precedence: command line > environment > config file > default."
    )
    # The default goes into the help text (usage would print the parsed object's
    # repr); a default too long for the help column is described instead, since
    # usage wraps inside a word that does not fit (the full value: etc/towerws.conf).
    optParameters = [["config", "c", None, "INI config file (also TOWERWS_CONFIG)"]] + [
        [config.cli_name(f.name), None, None,
         f"{f.metadata['help']} [default: {f.metadata.get('brief') or config.shown_default(f)}]"]
        for f in config.OPTIONS
        if not f.metadata.get("flag")
    ]
    # Switches take no value on the command line (``--console``); elsewhere they are true/false.
    optFlags = [[config.cli_name(f.name), None, f.metadata["help"]] for f in config.OPTIONS if f.metadata.get("flag")]

    def opt_version(self) -> None:
        """Print the versions of towerws and of the libraries it is pinned to, and exit."""
        from towerws import __version__

        # Distribution metadata, not imports: txAMQP is otherwise loaded only with a broker.
        libraries = ", ".join(f"{name} {metadata.version(name)}" for name in ("Twisted", "Autobahn", "txAMQP"))
        sys.stdout.write(f"towerws {__version__} ({libraries})\n")
        raise SystemExit(0)

    def parseOptions(self, options: list[str] | None = None) -> None:
        # twistd answers a usage error with the whole usage text; an operator
        # needs the one line that names the option and the problem.
        try:
            super().parseOptions(options)
        except usage.UsageError as exc:
            sys.stderr.write(f"twistd towerws: {exc}\n")
            raise SystemExit(2) from None

    def postOptions(self) -> None:
        cli = {f.name: self[config.cli_name(f.name)] for f in config.OPTIONS}
        for f in config.OPTIONS:
            if f.metadata.get("flag"):
                cli[f.name] = "true" if cli[f.name] else None  # absent: environment, file or default
        try:
            self.settings = config.load(cli, config_file=self["config"])
            if self.settings.log_format == "json" and self.parent is not None:
                from towerws.logs import check_twistd_options

                check_twistd_options(self.parent)
        except (config.ConfigError, ValueError) as exc:
            raise usage.UsageError(str(exc)) from None


@implementer(IServiceMaker, IPlugin)
class TowerServiceMaker:
    tapname = "towerws"
    description = "Live-update websocket server for Ansible Tower / AWX, fed by RabbitMQ."
    options = Options

    def makeService(self, options: Options):
        from towerws.app import make_service

        service = make_service(options.settings)
        # A process of its own (not a test's): start-up objects leave the GC's scans.
        service.freeze_heap = options.parent is not None
        if options.settings.log_format == "json" and options.parent is not None:
            from towerws.logs import json_observer, twistd_log_file

            # Written where twistd would write its text log; see TowerService.setServiceParent.
            service.log_observer = json_observer(twistd_log_file(options.parent), options.settings.node_id)
        return service


serviceMaker = TowerServiceMaker()
