"""Training: the one assembly of model, criterion, optimizer and data, the jitted step, the loop, optimizer rules."""
