"""The learned models of the hierarchy: plain `nn.Module`s, no Lightning and no data code."""
