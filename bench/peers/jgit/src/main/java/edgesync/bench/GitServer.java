package edgesync.bench;

import java.io.File;
import java.net.InetSocketAddress;

import org.eclipse.jetty.ee10.servlet.ServletContextHandler;
import org.eclipse.jetty.ee10.servlet.ServletHolder;
import org.eclipse.jetty.server.Server;
import org.eclipse.jetty.server.ServerConnector;
import org.eclipse.jgit.http.server.GitServlet;
import org.eclipse.jgit.transport.resolver.FileResolver;

/**
 * Serves every bare repository under a directory as http://127.0.0.1:PORT/NAME.git (read
 * only: fetch and clone), then prints the port on standard output.
 *
 * <p>Usage: GitServer ROOT
 */
public final class GitServer {
  public static void main(String[] args) throws Exception {
    if (args.length != 1) {
      System.err.println("usage: GitServer ROOT");
      System.exit(2);
    }
    GitServlet git = new GitServlet();
    git.setRepositoryResolver(new FileResolver<>(new File(args[0]), true));
    Server server = new Server(new InetSocketAddress("127.0.0.1", 0));
    ServletContextHandler context = new ServletContextHandler();
    context.setContextPath("/");
    context.addServlet(new ServletHolder(git), "/*");
    server.setHandler(context);
    server.start();
    int port = ((ServerConnector) server.getConnectors()[0]).getLocalPort();
    System.out.println(port);
    System.out.flush();
    server.join();
  }
}
