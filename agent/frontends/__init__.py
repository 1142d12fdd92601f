"""The front-ends: the command line, the web page and the Ray batch driver. They call the agent's core; the core never
imports them."""
