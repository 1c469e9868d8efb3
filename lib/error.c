/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Thread-local error messages for the control path (vdisk_get_error_msg). */
#include <stdarg.h>
#include <stdio.h>

#include "vd-internal.h"

static _Thread_local char error_msg[VD_ERROR_MSG_MAX];

int vd_error(int err, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(error_msg, sizeof(error_msg), fmt, ap);
	va_end(ap);
	return -err;
}

void vd_error_clear(void)
{
	error_msg[0] = '\0';
}

VD_EXPORT const char *vdisk_get_error_msg(void)
{
	return error_msg;
}
