"""Deploying the FLARE transport: provisioning (POC kits), kit policy, the mesh job, participants, supervision.

``launcher.FlareFederation`` brings a whole federation up on this machine;
``participant`` runs one site or the server from a provisioned kit (for
deployments across machines).
"""
