"""Pure core: spec models and reader, selectors, graph, plan, states, status, events. No I/O."""
