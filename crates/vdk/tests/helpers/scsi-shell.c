/*
 * scsi-shell: sends SCSI commands to one iSCSI LUN over one session of libiscsi, the
 * initiator library QEMU uses, and prints each answer; the tests check the answers against
 * the SCSI and MMC specifications. Built by the tests with `cc scsi-shell.c -liscsi`.
 *
 * Usage: scsi-shell iscsi://HOST:PORT/IQN/LUN [INITIATOR-NAME]
 *
 * One command per line on stdin:
 *   in LEN CDBHEX          a command that reads up to LEN bytes
 *   out CDBHEX DATAHEX     a command that writes DATA
 *   none CDBHEX            a command without data
 * One line per command on stdout:
 *   status=S key=K asc=A ascq=Q field=F bit=B data=HEX
 * with the SCSI status, and for CHECK CONDITION the sense key, code, qualifier and, when the
 * sense carries one, the field pointer (F) and bit pointer (B), else -1.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <iscsi/iscsi.h>
#include <iscsi/scsi-lowlevel.h>

static int unhex(const char *s, unsigned char *out, int max)
{
	int n = 0;
	while (s[0] && s[1] && n < max) {
		unsigned int b;
		if (sscanf(s, "%2x", &b) != 1)
			return -1;
		out[n++] = (unsigned char)b;
		s += 2;
	}
	return n;
}

int main(int argc, char **argv)
{
	const char *initiator = argc > 2 ? argv[2] : "iqn.2026-11.org.vdk.test:scsi-shell";
	struct iscsi_context *iscsi;
	struct iscsi_url *url;
	static char line[1 << 20];
	static unsigned char data[1 << 19];

	if (argc < 2) {
		fprintf(stderr, "usage: scsi-shell iscsi://HOST:PORT/IQN/LUN [INITIATOR]\n");
		return 2;
	}
	iscsi = iscsi_create_context(initiator);
	url = iscsi_parse_full_url(iscsi, argv[1]);
	if (url == NULL) {
		fprintf(stderr, "bad url: %s\n", iscsi_get_error(iscsi));
		return 2;
	}
	iscsi_set_targetname(iscsi, url->target);
	iscsi_set_session_type(iscsi, ISCSI_SESSION_NORMAL);
	if (iscsi_full_connect_sync(iscsi, url->portal, url->lun) != 0) {
		fprintf(stderr, "login failed: %s\n", iscsi_get_error(iscsi));
		return 1;
	}
	printf("ready\n");
	fflush(stdout);
	while (fgets(line, sizeof(line), stdin)) {
		char dir[8], cdbhex[80], arg[sizeof(line)];
		unsigned char cdb[16];
		struct scsi_task *task;
		struct iscsi_data out = { 0, NULL };
		int n, cdblen, len = 0, xfer = SCSI_XFER_NONE;

		arg[0] = 0;
		n = sscanf(line, "%7s %79s %s", dir, cdbhex, arg);
		if (n < 2)
			continue;
		if (!strcmp(dir, "in")) {
			len = atoi(cdbhex);
			strcpy(cdbhex, arg);
			xfer = SCSI_XFER_READ;
		} else if (!strcmp(dir, "out")) {
			int k = unhex(arg, data, sizeof(data));
			if (k < 0) {
				printf("error=bad-data\n");
				fflush(stdout);
				continue;
			}
			out.size = k;
			out.data = data;
			len = k;
			xfer = SCSI_XFER_WRITE;
		}
		cdblen = unhex(cdbhex, cdb, sizeof(cdb));
		if (cdblen <= 0) {
			printf("error=bad-cdb\n");
			fflush(stdout);
			continue;
		}
		task = scsi_create_task(cdblen, cdb, xfer, len);
		if (iscsi_scsi_command_sync(iscsi, url->lun, task,
					    xfer == SCSI_XFER_WRITE ? &out : NULL) == NULL) {
			printf("error=transport %s\n", iscsi_get_error(iscsi));
			fflush(stdout);
			scsi_free_scsi_task(task);
			continue;
		}
		printf("status=%d key=%d asc=%d ascq=%d field=%d bit=%d data=",
		       task->status,
		       task->status == SCSI_STATUS_CHECK_CONDITION ? (int)task->sense.key : 0,
		       task->status == SCSI_STATUS_CHECK_CONDITION ? task->sense.ascq >> 8 : 0,
		       task->status == SCSI_STATUS_CHECK_CONDITION ? task->sense.ascq & 0xff : 0,
		       task->sense.sense_specific ? task->sense.field_pointer : -1,
		       task->sense.sense_specific && task->sense.bit_pointer_valid ?
		       task->sense.bit_pointer : -1);
		for (n = 0; n < task->datain.size; n++)
			printf("%02x", task->datain.data[n]);
		printf("\n");
		fflush(stdout);
		scsi_free_scsi_task(task);
	}
	iscsi_logout_sync(iscsi);
	iscsi_destroy_url(url);
	iscsi_destroy_context(iscsi);
	return 0;
}
