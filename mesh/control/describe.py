"""What `mesh check` prints: each service and route as loaded, each chain in the order its plugins run."""

from __future__ import annotations

from typing import Any

from mesh.config import MeshConfig

__all__ = ["describe"]


def describe(config: MeshConfig) -> str:
    """What `mesh check` loaded, for a person to read: each chain in the order its plugins run."""
    from mesh.sidecar.route_chains import chain_order, show

    mode = "routes enforced" if config.mode == "enforce" else "audit mode: denials are logged, not enforced"
    lines = [f"{config.path}: ok", f"mesh '{config.name}' ({mode})"]
    if config.plugin_path:
        lines.append("plugin_path: " + ", ".join(str(p) for p in config.plugin_path))
    lines.append("services:")
    orders = {name: chain_order(config, name) for name in config.services}
    for name, service in config.services.items():
        facts = []
        if service.command:
            facts.append(f"command: {service.command}")
        if service.build or service.image:
            facts.append(f"build: {service.build}" if service.build else f"image: {service.image}")
        if service.expose is not None:
            facts.append(f"exposed on 127.0.0.1:{service.expose}")
        if service.health:
            facts.append(f"health: {service.health}")
        if service.replicas != 1:
            facts.append(f"replicas: {service.replicas}")
        if service.scale is not None:
            scale = service.scale
            facts.append(f"scale: min {scale.min}, max {scale.max}, cpu {scale.cpu:g}, "
                         f"cooldown {float(scale.cooldown):g}s")
        if service.instances is not None:
            keyed = service.instances
            facts.append(f"instances: one per {keyed.key}, sleep_after {float(keyed.sleep_after):g}s, "
                         f"max {keyed.max}, start_timeout {float(keyed.start_timeout):g}s"
                         + (f", a volume per key at {keyed.volume}" if keyed.volume else ""))
        if service.lifecycle:
            facts.append(f"lifecycle: {service.lifecycle}")
        lines.append(f"  {name}: " + "; ".join(facts))
        for title, specs in (("plugins", service.plugin_specs), ("outbound", service.outbound_specs)):
            for spec in specs:
                lines.append(f"    {title}: {spec.use}{_options(spec.options)}")
        order = orders[name]
        lines.append(f"    inbound chain: {show(order.inbound, 'app')}")
        for i, (entry, chain) in enumerate(zip(service.routes, order.routes, strict=True)):
            inherit = "" if entry.inherit else " (inherit = false)"
            lines.append(f"    routes[{i}] {' '.join(entry.methods) or 'any method'} {', '.join(entry.paths)}"
                         f"{inherit}: {show(chain, 'app', entry.plugin_specs)}")
            for spec in entry.plugin_specs:
                lines.append(f"      plugins: {spec.use}{_options(spec.options)}")
        lines.append(f"    outbound chain: {show(order.outbound, 'peer')}")
    defaults = config.defaults
    lines.append(f"defaults: timeout {float(defaults.timeout):g}s, max_pending {defaults.max_pending}, "
                 f"lb {defaults.lb}")
    lines.append("routes:" if config.routes else "routes: none (no service may call another)")
    for route in config.routes:
        narrowed = " ".join(route.methods) or "any method"
        paths = ", ".join(route.paths) or "any path"
        extra = f", timeout {float(route.timeout):g}s" if route.timeout is not None else ""
        pending = route.max_pending if route.max_pending is not None else defaults.max_pending
        extra += f", max_pending {pending}"
        mode = ", audit only" if route.mode == "audit" else ""
        lines.append(f"  {route.source} -> {route.to}: {narrowed} {paths}{extra}{mode}")
        if route.plugin_specs:
            for spec in route.plugin_specs:
                lines.append(f"    plugins: {spec.use}{_options(spec.options)}")
            chain = next(names for call, names in orders[route.source].calls if call is route)
            lines.append(f"    chain in {route.source}'s sidecar: {show(chain, route.to, route.plugin_specs)}")
    return "\n".join(lines)


def _options(options: dict[str, Any]) -> str:
    if not options:
        return ""
    return " (" + ", ".join(f"{k}={_show(v)}" for k, v in options.items()) + ")"


def _show(value: Any) -> str:
    text = getattr(value, "text", None)  # a Rate keeps the text it was written as
    if isinstance(text, str):
        return repr(text)
    if isinstance(value, float) and type(value) is not float:  # a Duration
        return f"{float(value):g}s"
    return repr(value)
