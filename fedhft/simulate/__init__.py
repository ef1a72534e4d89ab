"""`fedhft simulate`: the whole system on one machine (export, broker, server, many edge runtimes)."""
