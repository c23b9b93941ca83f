/*
 * minrelay IP:PORT - the floor of a per-connection relay: a static program
 * that connects to IP:PORT (IPv4) and splices both directions between it and the
 * connection on fd 0 until both are done.  No parsing, no logging, no
 * timeouts: what any inetd-style relay has to do at least.
 */
#include <sys/socket.h>

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int, char *[]);

int
main(int argc, char *argv[])
{
	struct sockaddr_in sin;
	struct pollfd pfd[2];
	char *colon;
	int fd[2], pipes[2][2], inpipe[2] = { 0, 0 }, eof[2] = { 0, 0 };
	int i, one = 1;
	ssize_t n;

	if (argc != 2 || (colon = strrchr(argv[1], ':')) == NULL)
		return 64;
	*colon = '\0';
	memset(&sin, 0, sizeof(sin));
	sin.sin_family = AF_INET;
	sin.sin_port = htons(atoi(colon + 1));
	if (sin.sin_port == 0 || inet_pton(AF_INET, argv[1], &sin.sin_addr) != 1)
		return 64;
	fd[0] = 0;
	if ((fd[1] = socket(AF_INET, SOCK_STREAM, 0)) == -1)
		return 69;
	setsockopt(fd[1], IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (connect(fd[1], (struct sockaddr *)&sin, sizeof(sin)) == -1)
		return 69;
	if (pipe2(pipes[0], O_NONBLOCK) == -1 || pipe2(pipes[1], O_NONBLOCK) == -1)
		return 71;
	fcntl(fd[0], F_SETFL, O_NONBLOCK);
	fcntl(fd[1], F_SETFL, O_NONBLOCK);
	/* direction i: fd[i] -> pipes[i] -> fd[1 - i] */
	while (!(eof[0] && eof[1] && inpipe[0] == 0 && inpipe[1] == 0)) {
		for (i = 0; i < 2; i++) {
			pfd[i].fd = fd[i];
			pfd[i].events = 0;
		}
		for (i = 0; i < 2; i++) {
			if (!eof[i] && inpipe[i] == 0)
				pfd[i].events |= POLLIN;
			if (inpipe[i] > 0)
				pfd[1 - i].events |= POLLOUT;
		}
		if (poll(pfd, 2, -1) == -1)
			return 74;
		for (i = 0; i < 2; i++) {
			if (!eof[i] && inpipe[i] == 0 &&
			    (pfd[i].revents & (POLLIN | POLLHUP | POLLERR))) {
				n = splice(fd[i], NULL, pipes[i][1], NULL,
				    1 << 20, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
				if (n > 0)
					inpipe[i] += n;
				else if (n == 0 || errno != EAGAIN) {
					eof[i] = 1;
					if (inpipe[i] == 0)
						shutdown(fd[1 - i], SHUT_WR);
				}
			}
			if (inpipe[i] > 0 &&
			    (pfd[1 - i].revents & (POLLOUT | POLLERR | POLLHUP))) {
				n = splice(pipes[i][0], NULL, fd[1 - i], NULL,
				    inpipe[i], SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
				if (n > 0)
					inpipe[i] -= n;
				else if (errno != EAGAIN)
					return 74;
				if (inpipe[i] == 0 && eof[i])
					shutdown(fd[1 - i], SHUT_WR);
			}
		}
	}
	return 0;
}
