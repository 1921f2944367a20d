"""Bus backends. Each is one module or small package, registered through the entry-point
group ``agentevents`` exactly like a third-party plugin, and imported only when used."""
