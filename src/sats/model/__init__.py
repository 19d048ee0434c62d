"""Model: the configuration, the network and its losses, patch sampling, the case cache,
the training loop and the RUN folder it writes."""
