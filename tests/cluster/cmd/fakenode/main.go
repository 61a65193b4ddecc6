// Command fakenode plays scheduler and kubelet for the test control plane: it registers Ready
// nodes, binds unscheduled pods to them and reports their containers as running and ready, so
// Deployments reach Available without a container runtime.
//
// Images whose reference contains "crashloop" stay in CrashLoopBackOff and those containing
// "imagepullbackoff" stay in ImagePullBackOff, so tests can exercise unhealthy workloads.
// Pods with restartPolicy Never or OnFailure (Jobs, hooks) run to Succeeded. Pods whose
// nodeSelector no node matches stay Pending and Unschedulable, as the scheduler leaves them.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/util/workqueue"
)

type fakeKubelet struct {
	client kubernetes.Interface
	nodes  []string
	next   atomic.Uint64
	queue  workqueue.TypedRateLimitingInterface[string]
	lister func(key string) (*corev1.Pod, bool)
}

func main() {
	kubeconfig := flag.String("kubeconfig", "", "admin kubeconfig")
	count := flag.Int("nodes", 2, "number of fake nodes")
	flag.Parse()

	cfg, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		fail("kubeconfig: %v", err)
	}
	cfg.QPS, cfg.Burst = 200, 400
	client := kubernetes.NewForConfigOrDie(cfg)
	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer cancel()

	k := &fakeKubelet{
		client: client,
		queue:  workqueue.NewTypedRateLimitingQueue(workqueue.DefaultTypedControllerRateLimiter[string]()),
	}
	for i := 0; i < *count; i++ {
		name := fmt.Sprintf("fake-node-%d", i)
		if err := registerNode(ctx, client, name); err != nil {
			fail("register node %s: %v", name, err)
		}
		k.nodes = append(k.nodes, name)
	}

	factory := informers.NewSharedInformerFactory(client, 0)
	podInformer := factory.Core().V1().Pods().Informer()
	enqueue := func(obj interface{}) {
		if key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj); err == nil {
			k.queue.Add(key)
		}
	}
	_, _ = podInformer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    enqueue,
		UpdateFunc: func(_, obj interface{}) { enqueue(obj) },
	})
	k.lister = func(key string) (*corev1.Pod, bool) {
		obj, ok, err := podInformer.GetIndexer().GetByKey(key)
		if err != nil || !ok {
			return nil, false
		}
		return obj.(*corev1.Pod), true
	}
	factory.Start(ctx.Done())
	cache.WaitForCacheSync(ctx.Done(), podInformer.HasSynced)
	fmt.Println("fakenode ready")
	for w := 0; w < 4; w++ {
		go k.work(ctx)
	}
	<-ctx.Done()
	k.queue.ShutDown()
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
	os.Exit(1)
}

func registerNode(ctx context.Context, client kubernetes.Interface, name string) error {
	capacity := corev1.ResourceList{
		corev1.ResourceCPU:    resource.MustParse("64"),
		corev1.ResourceMemory: resource.MustParse("256Gi"),
		corev1.ResourcePods:   resource.MustParse("1000"),
	}
	node := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: nodeLabels(name)},
	}
	created, err := client.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		created, err = client.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
	}
	if err != nil {
		return err
	}
	now := metav1.Now()
	created.Status = corev1.NodeStatus{
		Capacity:    capacity,
		Allocatable: capacity,
		Phase:       corev1.NodeRunning,
		Conditions: []corev1.NodeCondition{{
			Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady",
			LastHeartbeatTime: now, LastTransitionTime: now,
		}},
		Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "10.0.0.1"}},
	}
	_, err = client.CoreV1().Nodes().UpdateStatus(ctx, created, metav1.UpdateOptions{})
	return err
}

func (k *fakeKubelet) work(ctx context.Context) {
	for {
		key, quit := k.queue.Get()
		if quit {
			return
		}
		err := k.reconcile(ctx, key)
		if err != nil && !apierrors.IsNotFound(err) {
			k.queue.AddRateLimited(key)
		} else {
			k.queue.Forget(key)
		}
		k.queue.Done(key)
	}
}

func (k *fakeKubelet) reconcile(ctx context.Context, key string) error {
	pod, ok := k.lister(key)
	if !ok {
		return nil
	}
	pods := k.client.CoreV1().Pods(pod.Namespace)
	if pod.DeletionTimestamp != nil {
		// What the kubelet does once containers have stopped: remove the pod for good.
		zero := int64(0)
		return pods.Delete(ctx, pod.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero})
	}
	if pod.Spec.NodeName == "" {
		fits := k.fitting(pod)
		if len(fits) == 0 {
			return k.unschedulable(ctx, pod)
		}
		node := fits[k.next.Add(1)%uint64(len(fits))]
		return pods.Bind(ctx, &corev1.Binding{
			ObjectMeta: metav1.ObjectMeta{Name: pod.Name, UID: pod.UID},
			Target:     corev1.ObjectReference{Kind: "Node", Name: node},
		}, metav1.CreateOptions{})
	}
	if pod.Status.Phase != "" && pod.Status.Phase != corev1.PodPending {
		return nil
	}
	status := runningStatus(pod)
	updated := pod.DeepCopy()
	updated.Status = status
	_, err := pods.UpdateStatus(ctx, updated, metav1.UpdateOptions{})
	return err
}

// nodeLabels are the labels registerNode gives node name.
func nodeLabels(name string) map[string]string {
	return map[string]string{"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "type": "fake"}
}

// fitting lists the nodes whose labels satisfy the pod's nodeSelector, as the scheduler's
// NodeAffinity filter does for it.
func (k *fakeKubelet) fitting(pod *corev1.Pod) []string {
	var fits []string
	for _, node := range k.nodes {
		labels := nodeLabels(node)
		ok := true
		for key, want := range pod.Spec.NodeSelector {
			if labels[key] != want {
				ok = false
			}
		}
		if ok {
			fits = append(fits, node)
		}
	}
	return fits
}

// unschedulable reports what the scheduler reports for a pod no node fits: Pending with
// PodScheduled False, reason Unschedulable.
func (k *fakeKubelet) unschedulable(ctx context.Context, pod *corev1.Pod) error {
	for _, c := range pod.Status.Conditions {
		if c.Type == corev1.PodScheduled && c.Reason == corev1.PodReasonUnschedulable {
			return nil
		}
	}
	updated := pod.DeepCopy()
	updated.Status.Phase = corev1.PodPending
	updated.Status.Conditions = []corev1.PodCondition{{
		Type: corev1.PodScheduled, Status: corev1.ConditionFalse,
		Reason:             corev1.PodReasonUnschedulable,
		Message:            fmt.Sprintf("0/%d nodes are available: %d node(s) didn't match Pod's node affinity/selector.", len(k.nodes), len(k.nodes)),
		LastTransitionTime: metav1.Now(),
	}}
	_, err := k.client.CoreV1().Pods(pod.Namespace).UpdateStatus(ctx, updated, metav1.UpdateOptions{})
	return err
}

func runningStatus(pod *corev1.Pod) corev1.PodStatus {
	now := metav1.NewTime(time.Now())
	finishes := pod.Spec.RestartPolicy == corev1.RestartPolicyNever ||
		pod.Spec.RestartPolicy == corev1.RestartPolicyOnFailure
	allReady := true
	var statuses []corev1.ContainerStatus
	for _, c := range pod.Spec.Containers {
		cs := corev1.ContainerStatus{
			Name: c.Name, Image: c.Image, ImageID: "fake://" + c.Image,
			ContainerID: "fake://" + string(pod.UID) + "/" + c.Name,
		}
		image := strings.ToLower(c.Image)
		switch {
		case strings.Contains(image, "crashloop"):
			cs.RestartCount = 5
			cs.State.Waiting = &corev1.ContainerStateWaiting{Reason: "CrashLoopBackOff",
				Message: "back-off restarting failed container"}
			allReady = false
		case strings.Contains(image, "imagepullbackoff"):
			cs.State.Waiting = &corev1.ContainerStateWaiting{Reason: "ImagePullBackOff",
				Message: "Back-off pulling image " + c.Image}
			allReady = false
		case finishes:
			cs.State.Terminated = &corev1.ContainerStateTerminated{ExitCode: 0, Reason: "Completed",
				StartedAt: now, FinishedAt: now}
		default:
			started := true
			cs.Ready, cs.Started = true, &started
			cs.State.Running = &corev1.ContainerStateRunning{StartedAt: now}
		}
		statuses = append(statuses, cs)
	}
	phase := corev1.PodRunning
	if finishes && allReady {
		phase = corev1.PodSucceeded
	}
	ready := corev1.ConditionFalse
	if allReady && !finishes {
		ready = corev1.ConditionTrue
	}
	cond := func(t corev1.PodConditionType, s corev1.ConditionStatus) corev1.PodCondition {
		return corev1.PodCondition{Type: t, Status: s, LastTransitionTime: now}
	}
	return corev1.PodStatus{
		Phase: phase,
		Conditions: []corev1.PodCondition{
			cond(corev1.PodScheduled, corev1.ConditionTrue),
			cond(corev1.PodInitialized, corev1.ConditionTrue),
			cond(corev1.ContainersReady, ready),
			cond(corev1.PodReady, ready),
		},
		HostIP:            "10.0.0.1",
		PodIP:             fmt.Sprintf("10.244.%d.%d", now.Unix()%250, now.Nanosecond()%250+1),
		StartTime:         &now,
		ContainerStatuses: statuses,
	}
}
