"""CNI (`network = "cni"`): the node's own conflist run per the CNI spec with the plugins of
Debian's containernetworking-plugins: ADD in order, each plugin given the previous one's result;
DEL in reverse with the cached result; CHECK with it at start. The result is cached under the
state directory, as libcni caches it, so DEL works after a restart and CHECK has something to
check. Plain subprocesses of the plugins; network.py puts the tenant rules on top.
"""

from __future__ import annotations

import json
import os
import subprocess

from stockade.runtime.errors import SpecError, StockadeError
from stockade.runtime.files import write_atomic

PLUGIN_TIMEOUT = 60  # seconds a plugin gets (host-local waits for its lock, bridge for the kernel)


class CNIError(StockadeError):
    """A plugin failed (its own code and message, CNI's error format)."""


def load_conflist(conf_dir: str) -> dict:
    """The first network configuration in CONF_DIR (lexical order, as kubelet's CNI code takes
    it): a .conflist as is, a single-plugin .conf wrapped into one."""
    try:
        names = sorted(n for n in os.listdir(conf_dir) if n.endswith((".conflist", ".conf", ".json")))
    except FileNotFoundError:
        names = []
    if not names:
        raise SpecError("no CNI network configuration", where=conf_dir, hint="e.g. 10-pods.conflist")
    path = os.path.join(conf_dir, names[0])
    try:
        with open(path) as f:
            conf = json.load(f)
    except (OSError, ValueError) as exc:
        raise SpecError(f"the CNI configuration does not load: {exc}", where=path) from None
    if "plugins" not in conf:
        conf = {"cniVersion": conf.get("cniVersion", "0.4.0"), "name": conf.get("name", ""),
                "plugins": [conf]}
    if not conf.get("name") or not isinstance(conf.get("plugins"), list) or not conf["plugins"] or not all(
            isinstance(p, dict) and p.get("type") for p in conf["plugins"]):
        raise SpecError("a CNI configuration needs a name and plugins, each with a type", where=path)
    conf["_path"] = path
    return conf


class CNI:
    def __init__(self, conf_dir: str, bin_dir: str, cache_dir: str) -> None:
        self.conf = load_conflist(conf_dir)
        self.bin_dir, self.cache_dir = bin_dir, cache_dir
        os.makedirs(cache_dir, mode=0o700, exist_ok=True)
        for plugin in self.conf["plugins"]:
            if not os.access(os.path.join(bin_dir, plugin["type"]), os.X_OK):
                raise SpecError(f"CNI plugin {plugin['type']!r} is not in {bin_dir}",
                                where=self.conf["_path"],
                                hint="apt-get install containernetworking-plugins, or set cni_bin_dir")

    def add(self, pod_id: str, netns: str, args: dict, port_mappings: list[dict]) -> dict:
        """Run ADD through the list; the final result (cached). A failing plugin's error is
        raised after DEL has undone what the ones before it made."""
        result = None
        try:
            for plugin in self.conf["plugins"]:
                result = self._run("ADD", plugin, pod_id, netns, args, result, port_mappings)
        except BaseException:
            self.delete(pod_id, netns, args, port_mappings, result)
            raise
        write_atomic(self._cache(pod_id), json.dumps(result or {}), mode=0o600)
        return result or {}

    def check(self, pod_id: str, netns: str, args: dict, port_mappings: list[dict]) -> None:
        cached = self.cached(pod_id)
        for plugin in self.conf["plugins"]:
            self._run("CHECK", plugin, pod_id, netns, args, cached, port_mappings)

    def delete(self, pod_id: str, netns: str, args: dict, port_mappings: list[dict],
               result: dict | None = None) -> None:
        """DEL in reverse order; every plugin is asked even if one fails (the first error is
        raised afterwards), and a missing netns is fine (the spec asks plugins to cope)."""
        prev = result if result is not None else self.cached(pod_id)
        first: BaseException | None = None
        for plugin in reversed(self.conf["plugins"]):
            try:
                where = netns if os.path.exists(netns) else ""
                self._run("DEL", plugin, pod_id, where, args, prev, port_mappings)
            except CNIError as exc:
                first = first or exc
        try:
            os.unlink(self._cache(pod_id))
        except FileNotFoundError:
            pass
        if first is not None:
            raise first

    def cached(self, pod_id: str) -> dict | None:
        try:
            with open(self._cache(pod_id)) as f:
                return json.load(f)
        except (FileNotFoundError, ValueError):
            return None

    def _cache(self, pod_id: str) -> str:
        return os.path.join(self.cache_dir, f"{pod_id}.json")

    def _run(self, command: str, plugin: dict, pod_id: str, netns: str, args: dict, prev: dict | None,
             port_mappings: list[dict]) -> dict | None:
        conf = {k: v for k, v in plugin.items()}
        conf["cniVersion"], conf["name"] = self.conf["cniVersion"], self.conf["name"]
        if prev is not None:
            conf["prevResult"] = prev
        if "portMappings" in plugin.get("capabilities", {}) and port_mappings:
            conf["runtimeConfig"] = {"portMappings": port_mappings}
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": pod_id, "CNI_NETNS": netns, "CNI_IFNAME": "eth0",
               "CNI_PATH": self.bin_dir, "CNI_ARGS": ";".join(f"{k}={v}" for k, v in args.items()),
               "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
        try:
            proc = subprocess.run([os.path.join(self.bin_dir, plugin["type"])],
                                  input=json.dumps(conf).encode(), capture_output=True, env=env,
                                  timeout=PLUGIN_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            raise CNIError(f"CNI plugin {plugin['type']} ({command}) ran past {PLUGIN_TIMEOUT}s",
                           where=self.conf["_path"]) from None
        if proc.returncode != 0:
            raise CNIError(f"CNI plugin {plugin['type']} ({command}) failed: {_message(proc)}",
                           where=self.conf["_path"])
        if command != "ADD":
            return prev
        try:
            return json.loads(proc.stdout)
        except ValueError:
            raise CNIError(f"CNI plugin {plugin['type']} printed no JSON result",
                           where=self.conf["_path"]) from None


def _message(proc: subprocess.CompletedProcess) -> str:
    try:
        err = json.loads(proc.stdout)
        return f"{err.get('msg', '')} {err.get('details', '')} (code {err.get('code')})".strip()
    except ValueError:
        return (proc.stderr or proc.stdout).decode(errors="replace").strip() or f"exit {proc.returncode}"


def address_of(result: dict, version: int = 4) -> str:
    """The pod's first IPv4 (or IPv6) address in a CNI result ("" : none)."""
    for ip in result.get("ips", []):
        address = ip.get("address", "").split("/")[0]
        if address and (":" in address) == (version == 6):
            return address
    return ""


def host_interface(result: dict, conf: dict) -> str:
    """The node's end of the pod's link in a CNI result: an interface outside the pod's namespace
    that is not a bridge the conflist names ("" when the result has none)."""
    bridges = {plugin.get("bridge") for plugin in conf.get("plugins", [])}
    for interface in result.get("interfaces", []):
        name = interface.get("name", "")
        if name and not interface.get("sandbox") and name not in bridges:
            return name
    return ""
