#!/bin/sh
# kiln debian-azure guest (run in the chroot after debian/customize.sh): cloud-init with
# only its Azure datasource, as Azure Marketplace images ship it. It provisions from
# ovf-env.xml on the CD, IMDS and the wireserver (kiln build --provisioning azure).
set -eu
cat >/etc/cloud/cloud.cfg.d/91_kiln_azure.cfg <<'CFG'
# kiln debian-azure: the Azure datasource only (it runs when the DMI chassis asset tag
# says Azure or /var/lib/cloud/seed/azure/ovf-env.xml exists).
datasource_list: [ Azure ]
CFG
